"""The verification helper process: it must verify exactly what the serving process would, hand over the very
bytes it hashed, keep working after errors and deaths, never be waited on forever, and stay off the CPU the
requests need (SCHED_IDLE, nice 19) unless the machine has no idle CPU to give it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import time
import zipfile
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from daemon import registry
from daemon.serving.holder import ModelHolder
from daemon.serving.metrics import ServeMetrics
from daemon.serving.verifier import Verifier, VerifierUnavailable, verify_for_load

SHAPE = (1, 8, 8)
NAME = "tiny"
X = torch.rand((5, *SHAPE), generator=torch.Generator().manual_seed(7))


def publish(root: Path, seed: int) -> registry.VersionInfo:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)).eval()
    return registry.write_version(root, NAME, module, input_shape=SHAPE, classes=["a", "b", "c"],
                                  parent=registry.latest_version(root, NAME), export_pt2=False)


def alone(info: registry.VersionInfo, x: torch.Tensor) -> torch.Tensor:
    module = torch.jit.load(str(info.path / registry.TORCHSCRIPT_FILE), map_location="cpu").eval()
    with torch.inference_mode():
        return module(x)


def flip_storage_byte_and_rehash(info: registry.VersionInfo) -> None:
    """One byte of a tensor's data changed inside model.pt and the manifest made to agree: only the zip's own
    CRC-32 can tell."""
    path = info.path / registry.TORCHSCRIPT_FILE
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        entry = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size)
    name_len, extra_len = (int.from_bytes(data[entry.header_offset + k:entry.header_offset + k + 2], "little")
                           for k in (26, 28))
    data[entry.header_offset + 30 + name_len + extra_len] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = json.loads((info.path / registry.MANIFEST_FILE).read_text())
    manifest["files"][registry.TORCHSCRIPT_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (info.path / registry.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(idle_grace_s=30.0)     # idle throughout, even on a busy machine
    v.start()
    yield v
    v.close()


def test_the_helper_verifies_exactly_what_the_serving_process_would(tmp_path: Path, verifier: Verifier) -> None:
    info = publish(tmp_path, seed=1)
    got, want = verifier.verify(tmp_path, NAME, info.version), verify_for_load(tmp_path, NAME, info.version)
    assert got.info == want.info == registry.verify_version(tmp_path, NAME, info.version)
    assert bytes(got.data) == want.data == (info.path / registry.TORCHSCRIPT_FILE).read_bytes()
    assert got.layout == want.layout is not None and got.crc_ok and want.crc_ok
    assert got.policy == "idle" and want.policy is None
    flip_storage_byte_and_rehash(info)                # the same refusal, with the same reason, either way
    errors = []
    for verify in (verifier.verify, verify_for_load):
        with pytest.raises(registry.VerificationError, match="differs from model.safetensors") as caught:
            verify(tmp_path, NAME, info.version)
        errors.append((caught.value.code, caught.value.file, caught.value.reason))
    assert errors[0] == errors[1] and errors[0][:2] == ("mismatch", registry.TORCHSCRIPT_FILE)


def test_the_helper_runs_idle_at_nice_19(verifier: Verifier) -> None:
    pid = verifier.pid
    assert pid is not None
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert os.getpriority(os.PRIO_PROCESS, pid) == 19


def test_errors_are_the_registry_s_own_and_the_helper_keeps_answering(tmp_path: Path, verifier: Verifier) -> None:
    info = publish(tmp_path, seed=1)
    with pytest.raises(registry.RegistryError, match="no version 9"):
        verifier.verify(tmp_path, NAME, 9)
    path = info.path / registry.STATE_DICT_FILE
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(registry.VerificationError) as err:
        verifier.verify(tmp_path, NAME, info.version)
    assert err.value.file == registry.STATE_DICT_FILE and "sha256 mismatch" in err.value.reason
    good = publish(tmp_path, seed=2)
    assert verifier.verify(tmp_path, NAME, good.version).info.version == good.version


def test_a_dead_helper_is_replaced_and_a_stuck_one_given_up(tmp_path: Path) -> None:
    info = publish(tmp_path, seed=1)
    v = Verifier(timeout_s=30.0)
    try:
        v.start()
        first = v.pid
        os.kill(first, signal.SIGKILL)
        time.sleep(0.2)
        assert v.verify(tmp_path, NAME, info.version).info.version == info.version
        assert v.pid not in (None, first)
        second = v.pid
        os.kill(second, signal.SIGSTOP)          # a helper that never answers
        v.timeout_s = 0.5
        t0 = time.monotonic()
        with pytest.raises(VerifierUnavailable, match="in time"):
            v.verify(tmp_path, NAME, info.version)
        assert time.monotonic() - t0 < 5
        assert v.pid is None                      # given up (killed); the next call starts a fresh one
        v.timeout_s = 30.0
        assert v.verify(tmp_path, NAME, info.version).info.version == info.version
    finally:
        v.close()


def test_no_idle_cpu_raises_the_helper_to_finish(tmp_path: Path) -> None:
    info = publish(tmp_path, seed=1)
    v = Verifier(idle_grace_s=0.0)              # "no answer yet" at once: raised every time
    try:
        v.start()
        got = v.verify(tmp_path, NAME, info.version)
        assert got.info.version == info.version and got.policy == "other" and v.escalations == 1
        assert os.getpriority(os.PRIO_PROCESS, v.pid) == 19           # raised to SCHED_OTHER, at nice 19
        deadline = time.monotonic() + 5                                # back to idle right after answering
        while os.sched_getscheduler(v.pid) != os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.sched_getscheduler(v.pid) == os.SCHED_IDLE
        v.idle_grace_s = 30.0
        got = v.verify(tmp_path, NAME, info.version)
        assert got.info.version == info.version and got.policy == "idle" and v.escalations == 1
    finally:
        v.close()


def holder(root: Path, verifier: Verifier) -> tuple[ModelHolder, ServeMetrics]:
    metrics = ServeMetrics(CollectorRegistry())
    return ModelHolder(root, NAME, metrics=metrics, verifier=verifier), metrics


def test_swaps_through_the_helper_serve_exactly_each_version_and_refuse_bad_ones(tmp_path: Path,
                                                                                 verifier: Verifier) -> None:
    h, metrics = holder(tmp_path, verifier)
    assert h.swap_to(publish(tmp_path, seed=1).version).kind == "full"
    for seed in (2, 3):
        info = publish(tmp_path, seed=seed)
        assert h.swap_to(info.version).kind == "weights"
        assert torch.equal(h.current.infer(X), alone(info, X))
    good = h.current.version
    bad = publish(tmp_path, seed=4)
    flip_storage_byte_and_rehash(bad)                       # hashes agree; its tensors and the CRC-32 do not
    result = h.swap_to(bad.version)
    # refused before the CRC-32 is read: model.pt's tensors are not model.safetensors' (daemon.registry.trust)
    assert result.outcome == "failed" and result.error.reason == "mismatch"
    assert "differs from model.safetensors" in result.error.detail
    corrupt = publish(tmp_path, seed=5)
    (corrupt.path / registry.STATE_DICT_FILE).write_bytes(b"not the weights")
    result = h.swap_to(corrupt.version)
    assert result.outcome == "failed" and result.error.reason == "verification"
    assert h.current.version == good
    assert metrics.registry.get_sample_value("unlearnd_serve_swaps_total", {"outcome": "failed"}) == 2
    after = publish(tmp_path, seed=6)
    assert h.swap_to(after.version).kind == "weights"
    assert torch.equal(h.current.infer(X), alone(after, X))


def test_a_helper_that_cannot_answer_leaves_verification_to_the_serving_process(tmp_path: Path) -> None:
    v = Verifier(timeout_s=0.0)                 # never answers in time
    h, _ = holder(tmp_path, v)
    try:
        first, second = publish(tmp_path, seed=1), publish(tmp_path, seed=2)
        assert h.swap_to(first.version).outcome == "swapped"
        assert h.swap_to(second.version).kind == "weights"
        assert torch.equal(h.current.infer(X), alone(second, X))
    finally:
        v.close()
