"""The serving layer's parts in-process: holder refusals, watcher, protocol parsing, metrics, notify."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from daemon import registry
from daemon.registry import ops as registry_ops
from daemon.serving.holder import LoadError, ModelHolder
from daemon.serving.metrics import ServeMetrics
from daemon.serving.notify import notify_reload, reload_url
from daemon.serving.protocol import ProtocolError, encode_response, parse_infer_request
from daemon.serving.watcher import Watcher

SHAPE = (1, 8, 8)
NAME = "tiny"


def publish(root: Path, seed: int = 0, **kwargs: object) -> registry.VersionInfo:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    return registry.write_version(root, NAME, module, input_shape=SHAPE, classes=["a", "b", "c"],
                                  parent=registry.latest_version(root, NAME), **kwargs)


def rewrite_manifest(info: registry.VersionInfo, **changes: object) -> None:
    manifest = json.loads((info.path / registry.MANIFEST_FILE).read_text())
    manifest.update(changes)
    (info.path / registry.MANIFEST_FILE).write_text(json.dumps(manifest))


def holder(root: Path) -> tuple[ModelHolder, ServeMetrics]:
    metrics = ServeMetrics(CollectorRegistry())
    return ModelHolder(root, NAME, metrics=metrics), metrics


def failures(metrics: ServeMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("unlearnd_serve_load_failures_total", {"reason": reason})


# -- holder -------------------------------------------------------------------------------------------
def test_swap_loads_verifies_and_counts(tmp_path: Path) -> None:
    h, metrics = holder(tmp_path)
    assert h.current is None
    info = publish(tmp_path)
    result = h.swap_to(info.version)
    assert result.outcome == "swapped" and h.current.version == 1 and h.current.sha256 == info.sha256
    assert h.swap_to(1).outcome == "unchanged"
    assert metrics.registry.get_sample_value("unlearnd_serve_model_version") == 1
    assert metrics.registry.get_sample_value("unlearnd_serve_swaps_total", {"outcome": "swapped"}) == 1


@pytest.mark.parametrize("fault", ["missing", "verification", "load", "warmup"])
def test_a_bad_version_is_refused_with_its_reason_and_the_old_one_stays(tmp_path: Path, fault: str) -> None:
    h, metrics = holder(tmp_path)
    h.swap_to(publish(tmp_path).version)
    bad = publish(tmp_path, seed=1)
    if fault == "missing":
        (bad.path / registry.MANIFEST_FILE).unlink()
    elif fault == "verification":
        (bad.path / registry.STATE_DICT_FILE).write_bytes(b"rot")
    elif fault == "load":       # hashes match, but the archive is not TorchScript
        junk = b"not a torchscript archive"
        (bad.path / registry.TORCHSCRIPT_FILE).write_bytes(junk)
        files = bad.manifest["files"]
        files[registry.TORCHSCRIPT_FILE] = {"sha256": hashlib.sha256(junk).hexdigest(), "bytes": len(junk)}
        rewrite_manifest(bad, files=files)
    else:                       # the manifest promises 5 classes, the module gives 3 logits
        rewrite_manifest(bad, classes=list("abcde"))
    result = h.swap_to(bad.version)
    assert result.outcome == "failed" and isinstance(result.error, LoadError)
    assert result.error.reason == fault
    assert h.current.version == 1 and result.version == 1
    assert failures(metrics, fault) == 1


def test_watcher_follows_latest_does_not_retry_a_failure_unless_forced(tmp_path: Path) -> None:
    h, metrics = holder(tmp_path)
    watcher = Watcher(h, interval_s=0.05, server_id="unit")
    assert watcher.check().outcome == "unchanged" and h.current is None      # nothing published yet
    publish(tmp_path)
    assert watcher.check().outcome == "swapped"
    assert [lease.version for lease in registry_ops.live_leases(tmp_path, NAME)] == [1]
    bad = publish(tmp_path, seed=1)
    (bad.path / registry.STATE_DICT_FILE).write_bytes(b"rot")
    assert watcher.check().outcome == "failed"
    assert watcher.check().error.reason == "skipped"                        # polling leaves it alone
    assert failures(metrics, "verification") == 1
    assert watcher.check(force=True).error.reason == "verification"        # an explicit reload retries
    assert failures(metrics, "verification") == 2
    publish(tmp_path, seed=2)
    assert watcher.check().outcome == "swapped" and h.current.version == 3
    (tmp_path / NAME / registry.LATEST_FILE).write_text("garbage")
    assert watcher.check().error.reason == "registry" and h.current.version == 3
    watcher.check()
    assert failures(metrics, "registry") == 1                                # logged and counted once
    watcher.stop()
    assert registry_ops.read_leases(tmp_path, NAME) == []


def test_watcher_thread_polls(tmp_path: Path) -> None:
    h, _ = holder(tmp_path)
    publish(tmp_path)
    watcher = Watcher(h, interval_s=0.02)
    watcher.start()
    try:
        publish(tmp_path, seed=1)
        for _ in range(200):
            if h.current is not None and h.current.version == 2:
                break
            time.sleep(0.01)
        assert h.current.version == 2
    finally:
        watcher.stop()
        watcher.stop()      # idempotent


# -- protocol -----------------------------------------------------------------------------------------
def test_json_and_binary_requests_parse_to_the_same_batch() -> None:
    x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
    as_json = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [2, *SHAPE], "datatype": "FP32",
                                      "data": x.tolist()}]}).encode()           # nested lists are fine too
    parsed = parse_infer_request(as_json, None, input_shape=SHAPE, max_batch=4)
    header = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [2, *SHAPE], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    binary = parse_infer_request(header + x.tobytes(), str(len(header)), input_shape=SHAPE, max_batch=4)
    assert torch.equal(parsed.batch, torch.from_numpy(x)) and torch.equal(binary.batch, parsed.batch)
    assert not parsed.binary_output and binary.binary_output


@pytest.mark.parametrize(("body", "message"), [
    (b'{"inputs": [{"name": "INPUT__0", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [NaN]}]}',
     "has 1 values"),
    (json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1, 8, 8], "datatype": "FP32",
                             "data": [float("inf")] * 64}]}).encode(), "finite"),
    (json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1, 8, 8], "datatype": "FP32",
                             "data": [[0.5] * 60, [0.5] * 4]}]}).encode(), "regular array"),
    (json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [True] * 64}]}
                ).encode(), "numbers only"),
    (json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}],
                 "outputs": [{"name": "OUTPUT__0", "parameters": {"classification": 3}}]}).encode(),
     "classification"),
    (json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}],
                 "outputs": [{"name": "logits"}]}).encode(), "unknown output 'logits'"),
])
def test_protocol_errors_say_what_to_fix(body: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as err:
        parse_infer_request(body, None, input_shape=SHAPE, max_batch=4)
    assert err.value.status == 400


def test_binary_response_layout_matches_tritons() -> None:
    logits = torch.arange(6, dtype=torch.float32).view(2, 3)
    body, headers, media = encode_response(logits, model="m", version=7, request_id="r", binary=True)
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert head["model_version"] == "7" and head["outputs"][0]["parameters"] == {"binary_data_size": 24}
    assert np.frombuffer(body[n:], "<f4").tolist() == [0, 1, 2, 3, 4, 5] and media == "application/octet-stream"


# -- metrics and notify -------------------------------------------------------------------------------
def test_old_version_series_are_retired() -> None:
    metrics = ServeMetrics(CollectorRegistry(), version_series=2)
    for v in (1, 2, 3):
        metrics.observe_request(v, 200, 0.001)
    get = metrics.registry.get_sample_value
    assert get("unlearnd_serve_requests_total", {"version": "1", "code": "200"}) is None
    assert get("unlearnd_serve_requests_total", {"version": "3", "code": "200"}) == 1
    with pytest.raises(ValueError, match="unknown load failure reason"):
        metrics.refused("gremlins")


def test_notify_never_raises_and_fills_in_the_model_name() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]     # closed again: nothing listens there
    results = notify_reload([f"http://127.0.0.1:{port}/v2/repository/models/{{name}}/load", "not a url"],
                            timeout=0.5, model="a b")
    assert [r.ok for r in results] == [False, False] and results[0].url.endswith("/models/a%20b/load")
    assert results[0].status is None and "Error" in results[0].detail
    assert notify_reload([]) == []
    assert reload_url("http://h:1/", "m") == "http://h:1/v2/repository/models/m/load"
