"""`unlearnd serve` as a real process on 127.0.0.1: the KServe v2 subset, hot-swap, refusal, rollback, leases.

One server runs for the whole module; tests that publish read the version being served first and expect
the next one, so they hold in any order.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from daemon import registry
from daemon.registry import ops as registry_ops
from daemon.cli import main
from daemon.engine.models import build_model
from daemon.serving.notify import notify_reload, reload_url

NAME = "mnist-tiny"
SHAPE = (1, 28, 28)
CLASSES = [str(c) for c in range(10)]
MAX_BODY = 200_000
MAX_BATCH = 8
REPO = Path(__file__).resolve().parents[1]


def random_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mnist_cnn", num_classes=10, input_shape=SHAPE, mean=[0.0], std=[1.0])


_seed = iter(range(100, 10_000))


def publish(reg: Path, name: str = NAME, **kwargs: object) -> registry.VersionInfo:
    return registry.write_version(reg, name, random_model(next(_seed)), input_shape=SHAPE, classes=CLASSES,
                                  parent=registry.latest_version(reg, name), **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, reg: Path, model: str, *extra: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--registry", str(reg), "--model", model,
             "--port", str(self.port), "--poll-interval", "0.1", "--lease-ttl", "6",
             "--server-id", f"test-{self.port}", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if self.probe() == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        # never leave a server behind a failed start (one outlived a loaded CI run), and say what it printed
        self.proc.kill()
        out, _ = self.proc.communicate(timeout=20)
        raise RuntimeError(f"server did not start in 120 s; its output ends: {out[-3000:]}")

    def probe(self) -> int:
        """The status of the liveness endpoint (a TLS server's subclass speaks TLS)."""
        return request(self, "GET", "/v2/health/live")[0]

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=20)
        return self.proc.returncode, out


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def infer_json(server: Server, x: np.ndarray, model: str = NAME) -> tuple[int, dict[str, str], dict]:
    body = json.dumps({"inputs": [{"name": "INPUT__0", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
    status, headers, raw = request(server, "POST", f"/v2/models/{model}/infer", body,
                                   {"Content-Type": "application/json"})
    return status, headers, json.loads(raw)


def served_version(server: Server) -> int:
    status, headers, body = infer_json(server, np.zeros((1, *SHAPE), np.float32))
    assert status == 200, body
    return int(body["model_version"])


def wait_for_version(server: Server, version: int, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if served_version(server) == version:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"version {version} not served after {timeout} s (serving {served_version(server)})")


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, _, body = request(server, "GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def local_logits(reg: Path, version: int, x: np.ndarray) -> np.ndarray:
    module, _ = registry.load_torchscript(reg, NAME, version)
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-registry")
    publish(root)
    return root


@pytest.fixture(scope="module")
def server(reg: Path) -> Iterator[Server]:
    srv = Server(reg, NAME, "--max-body-bytes", str(MAX_BODY), "--max-batch-size", str(MAX_BATCH))
    yield srv
    rc, out = srv.stop()
    assert rc == 0, out


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- protocol -----------------------------------------------------------------------------------------
def test_tritonclient_reads_metadata_and_infers(server: Server, reg: Path) -> None:
    """tritonclient's own HTTP client: health, metadata, and inference in binary and JSON encodings."""
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME and meta["platform"] == "pytorch_libtorch"
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 10]}]
    x = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)
    for binary_in, binary_out in ((True, True), (False, False), (True, False)):
        inp = triton.InferInput("INPUT__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary_in)
        outputs = [triton.InferRequestedOutput("OUTPUT__0", binary_data=binary_out)]
        result = client.infer(NAME, [inp], outputs=outputs, request_id="r-1")
        version = int(result.get_response()["model_version"])
        assert result.get_response()["id"] == "r-1"
        np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), local_logits(reg, version, x), rtol=1e-5,
                                   atol=1e-6)
    result = client.infer(NAME, [inp])      # no outputs named: tritonclient asks for binary outputs
    assert result.as_numpy("OUTPUT__0").shape == (3, 10)
    assert client.get_model_repository_index()[0]["state"] == "READY"
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    assert not client.is_model_ready("nope")


def test_plain_json_like_curl_names_the_answering_version(server: Server, reg: Path) -> None:
    x = np.full((2, *SHAPE), 0.25, np.float32)
    status, headers, body = infer_json(server, x)
    assert status == 200
    version = int(body["model_version"])
    assert headers["x-model-version"] == str(version)
    assert headers["x-model-sha256"] == registry.read_manifest(reg, NAME, version)["sha256"]
    assert body["outputs"][0]["shape"] == [2, 10] and body["outputs"][0]["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(2, 10), local_logits(reg, version, x),
                               rtol=1e-5, atol=1e-6)
    gz = gzip.compress(json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                               "data": [0.5] * 784}]}).encode())
    status, headers, _ = request(server, "POST", f"/v2/models/{NAME}/versions/{version}/infer", gz,
                                 {"Content-Encoding": "gzip"})
    assert status == 200 and headers["x-model-version"] == str(version)


# -- swaps --------------------------------------------------------------------------------------------
def test_polling_serves_a_new_version(server: Server, reg: Path) -> None:
    before = served_version(server)
    info = publish(reg)
    assert info.version > before
    elapsed = wait_for_version(server, info.version)
    assert elapsed < 10.0     # polled, not left for a restart; the bar (<= 1 s) is benchmarks/serve_bench.py's


def test_notify_swaps_before_the_call_returns(server: Server, reg: Path) -> None:
    info = publish(reg)
    [result] = notify_reload([reload_url(server.base, NAME)])
    assert result.ok, result
    assert json.loads(result.detail)["model_version"] == str(info.version)
    assert served_version(server) == info.version      # no waiting: the swap is done when the call returns


def test_corrupted_version_is_refused_and_the_old_one_keeps_serving(server: Server, reg: Path) -> None:
    good = served_version(server)
    failures_before = scrape(server).get(("unlearnd_serve_load_failures_total", (("reason", "verification"),)), 0)
    bad = publish(reg, set_latest=False)
    corrupt(bad.path / registry.STATE_DICT_FILE)
    registry.atomic_write_bytes(reg / NAME / registry.LATEST_FILE, f"{bad.version}\n".encode())  # bit rot
    status, _, body = request(server, "POST", f"/v2/repository/models/{NAME}/load", b"{}")
    assert status == 500
    message = json.loads(body)["error"]
    assert f"version {bad.version} refused (verification)" in message and "model.safetensors" in message
    assert f"still serving version {good}" in message
    time.sleep(0.5)                                      # several polls: not retried, still the old one
    assert served_version(server) == good
    metrics = scrape(server)
    # the explicit load refuses it once; the watcher's poll may have tried (and refused) it just before the POST,
    # and an explicit reload retries a failed version by design: one or two refusals, never a retry loop
    refusals = metrics[("unlearnd_serve_load_failures_total", (("reason", "verification"),))] - failures_before
    assert refusals in (1, 2), refusals
    assert metrics[("unlearnd_serve_swaps_total", (("outcome", "failed"),))] >= 1
    assert metrics[("unlearnd_serve_model_version", ())] == good
    fixed = publish(reg)                                 # LATEST moves on to a sound version
    wait_for_version(server, fixed.version)


def test_rollback_serves_the_older_weights_again(server: Server, reg: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(1).random((2, *SHAPE), dtype=np.float32)
    old = served_version(server)
    _, _, before = infer_json(server, x)
    newer = publish(reg)
    wait_for_version(server, newer.version)
    _, _, after_publish = infer_json(server, x)
    assert after_publish["outputs"][0]["data"] != before["outputs"][0]["data"]
    rc = main(["registry", "rollback", "--registry", str(reg), "--model", NAME, "--to", str(old),
               "--notify", reload_url(server.base, NAME)])
    assert rc == 0
    assert "notify" in capsys.readouterr().out
    _, headers, rolled = infer_json(server, x)
    assert int(rolled["model_version"]) == newer.version + 1            # a new version, history grows
    assert rolled["outputs"][0]["data"] == before["outputs"][0]["data"]  # with the old weights
    manifest = registry.read_manifest(reg, NAME, newer.version + 1)
    assert manifest["parent"] == newer.version and manifest["rollback"]["to"] == old


def test_retention_never_deletes_the_served_version(server: Server, reg: Path) -> None:
    served = served_version(server)
    lease = {lease.server_id: lease for lease in registry_ops.live_leases(reg, NAME)}[f"test-{server.port}"]
    assert lease.version == served
    # LATEST names a damaged version (the server keeps the old one), and newer versions are not LATEST:
    # only the lease protects what is served.
    bad = publish(reg, set_latest=False)
    corrupt(bad.path / registry.TORCHSCRIPT_FILE)
    registry.atomic_write_bytes(reg / NAME / registry.LATEST_FILE, f"{bad.version}\n".encode())
    staged = [publish(reg, set_latest=False).version for _ in range(2)]
    result = registry_ops.prune(reg, NAME, keep=1)
    assert served in result.kept and result.protected[served] == [f"served by test-{server.port}"]
    # (a server that is trying the damaged version at this moment also holds a lease on it while it loads)
    assert "LATEST" in result.protected[bad.version] and staged[-1] in result.kept
    assert staged[0] in result.deleted
    assert served_version(server) == served
    registry.verify_version(reg, NAME, served)          # still whole on disk
    registry.set_latest(reg, NAME, staged[-1])
    wait_for_version(server, staged[-1])


# -- bad requests -------------------------------------------------------------------------------------
def _infer_body(**overrides: object) -> bytes:
    tensor = {"name": "INPUT__0", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.5] * 784}
    tensor.update(overrides)
    return json.dumps({"inputs": [tensor]}).encode()


BAD_REQUESTS = [
    ("wrong shape", "POST", f"/v2/models/{NAME}/infer", _infer_body(shape=[1, 3, 28, 28]), {}, 400,
     "does not match the model's [-1, 1, 28, 28]"),
    ("no batch dimension", "POST", f"/v2/models/{NAME}/infer", _infer_body(shape=[1, 28, 28]), {}, 400,
     "does not match"),
    ("wrong datatype", "POST", f"/v2/models/{NAME}/infer", _infer_body(datatype="INT64"), {}, 400,
     "datatype must be FP32, got 'INT64'"),
    ("wrong input name", "POST", f"/v2/models/{NAME}/infer", _infer_body(name="x"), {}, 400, "unknown input 'x'"),
    ("too few values", "POST", f"/v2/models/{NAME}/infer", _infer_body(data=[0.5] * 700), {}, 400,
     "has 700 values, shape needs 784"),
    ("strings as data", "POST", f"/v2/models/{NAME}/infer", _infer_body(data=["a"] * 784), {}, 400,
     "numbers only"),
    ("batch over the limit", "POST", f"/v2/models/{NAME}/infer",
     _infer_body(shape=[MAX_BATCH + 1, 1, 28, 28], data=[0.5] * (784 * (MAX_BATCH + 1))), {}, 400,
     f"batch size must lie in [1, {MAX_BATCH}]"),
    ("unknown model", "POST", "/v2/models/nope/infer", _infer_body(), {}, 404, "unknown model 'nope'"),
    ("unknown version", "POST", f"/v2/models/{NAME}/versions/999999/infer", _infer_body(), {}, 404,
     "version '999999' is not served"),
    ("malformed JSON", "POST", f"/v2/models/{NAME}/infer", b'{"inputs": [', {}, 400, "malformed JSON"),
    ("JSON not an object", "POST", f"/v2/models/{NAME}/infer", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("empty body", "POST", f"/v2/models/{NAME}/infer", b"", {}, 400, "empty request body"),
    ("no inputs", "POST", f"/v2/models/{NAME}/infer", b'{"inputs": []}', {}, 400, "needs 'inputs'"),
    ("oversize body", "POST", f"/v2/models/{NAME}/infer", b" " * (MAX_BODY + 1), {}, 413,
     f"exceeds the limit of {MAX_BODY} bytes"),
    ("binary size mismatch", "POST", f"/v2/models/{NAME}/infer",
     json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1, 28, 28], "datatype": "FP32",
                             "parameters": {"binary_data_size": 16}}]}).encode() + b"\0" * 16,
     {"Inference-Header-Content-Length": "108"}, 400, "binary_data_size 16 bytes, shape needs 3136"),
    ("unknown encoding", "POST", f"/v2/models/{NAME}/infer", _infer_body(), {"Content-Encoding": "br"}, 415,
     "not supported"),
    ("wrong method", "GET", f"/v2/models/{NAME}/infer", None, {}, 405, "not allowed"),
    ("unknown endpoint", "GET", "/v1/models", None, {}, 404, "no such endpoint"),
    ("load overrides", "POST", f"/v2/repository/models/{NAME}/load", b'{"parameters": {"config": "{}"}}', {}, 400,
     "overrides are not supported"),
]


@pytest.mark.parametrize(("case", "method", "path", "body", "headers", "status", "message"), BAD_REQUESTS,
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_4xx_with_a_clear_message(server: Server, case: str, method: str, path: str,
                                                   body: bytes | None, headers: dict[str, str], status: int,
                                                   message: str) -> None:
    if case == "binary size mismatch":    # the header length must be the JSON part's exact length
        headers = {"Inference-Header-Content-Length": str(len(body) - 16)}
    got, got_headers, raw = request(server, method, path, body, headers)
    assert got == status, raw
    assert message in json.loads(raw)["error"]
    assert got_headers["x-model-version"] != "none"
    assert served_version(server) >= 1                  # and the server keeps serving


def test_metrics_parse_and_break_down_by_version(server: Server) -> None:
    version = served_version(server)
    metrics = scrape(server)
    assert metrics[("unlearnd_serve_requests_total", (("code", "200"), ("version", str(version))))] >= 1
    assert metrics[("unlearnd_serve_request_duration_seconds_count", (("version", str(version)),))] >= 1
    assert metrics[("unlearnd_serve_model_version", ())] == version
    assert metrics[("unlearnd_serve_swaps_total", (("outcome", "swapped"),))] >= 1


# -- lifecycle ----------------------------------------------------------------------------------------
def test_starts_before_the_first_version_then_stops_cleanly_on_sigterm(reg: Path) -> None:
    """Not ready until a version exists; then it serves it; SIGTERM exits 0 and releases the lease."""
    srv = Server(reg, "later")
    try:
        assert request(srv, "GET", "/v2/health/ready")[0] == 503
        status, headers, body = infer_json(srv, np.zeros((1, *SHAPE), np.float32), model="later")
        assert status == 503 and "no version loaded yet" in body["error"] and headers["x-model-version"] == "none"
        info = publish(reg, name="later")
        deadline = time.monotonic() + 5
        while request(srv, "GET", "/v2/health/ready")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [lease.version for lease in registry_ops.live_leases(reg, "later")] == [info.version]
    finally:
        rc, out = srv.stop()
    assert rc == 0, out
    assert registry_ops.read_leases(reg, "later") == []
    assert '"event": "version_swapped"' in out
