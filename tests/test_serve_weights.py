"""Weight-only swaps: a new version with the served architecture is served by copying its weights into the
standby; the result must be exactly what loading its model.pt alone gives, and anything else a full load."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from daemon import registry
from daemon.registry.archive import read_layout
from daemon.serving.holder import ModelHolder
from daemon.serving.metrics import ServeMetrics

SHAPE = (1, 8, 8)
NAME = "tiny"


class Scaled(nn.Module):
    """A conv net with a buffer, and a tensor attribute that tracing bakes into the code as a constant."""

    def __init__(self, scale: float = 1.0, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.act = act()
        self.head = nn.Linear(4 * 64, 3)
        self.scale = torch.tensor([scale])       # not a buffer: a traced constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.act(self.norm(self.conv(x))), 1)) * self.scale


def publish(root: Path, seed: int, **kwargs: object) -> registry.VersionInfo:
    torch.manual_seed(seed)
    module = Scaled(**kwargs).eval()
    with torch.no_grad():                        # non-trivial running statistics
        module.norm.running_mean.uniform_(-0.5, 0.5)
        module.norm.running_var.uniform_(0.5, 2.0)
    return registry.write_version(root, NAME, module, input_shape=SHAPE, classes=["a", "b", "c"],
                                  parent=registry.latest_version(root, NAME), export_pt2=False)


def holder(root: Path) -> tuple[ModelHolder, ServeMetrics]:
    metrics = ServeMetrics(CollectorRegistry())
    return ModelHolder(root, NAME, metrics=metrics), metrics


def alone(info: registry.VersionInfo, x: torch.Tensor) -> torch.Tensor:
    """What the version's model.pt computes when loaded on its own."""
    module = torch.jit.load(str(info.path / registry.TORCHSCRIPT_FILE), map_location="cpu").eval()
    with torch.inference_mode():
        return module(x)


def served_output(h: ModelHolder, x: torch.Tensor) -> torch.Tensor:
    return h.current.infer(x)


X = torch.rand((5, *SHAPE), generator=torch.Generator().manual_seed(7))


def test_same_architecture_is_a_weight_only_swap_that_serves_exactly_the_new_weights(tmp_path: Path) -> None:
    h, metrics = holder(tmp_path)
    v1 = publish(tmp_path, seed=1)
    assert h.swap_to(v1.version).kind == "full"
    first = h.current
    for seed in (2, 3, 4):
        info = publish(tmp_path, seed=seed)
        result = h.swap_to(info.version)
        assert result.outcome == "swapped" and result.kind == "weights"
        assert h.current.version == info.version and h.current.sha256 == info.sha256
        assert torch.equal(served_output(h, X), alone(info, X))
    # the module that served version 1 was never written: it still computes version 1
    assert torch.equal(first.infer(X), alone(v1, X))
    assert not torch.equal(alone(v1, X), alone(info, X))
    assert metrics.registry.get_sample_value("unlearnd_serve_loads_total", {"kind": "weights"}) == 3
    assert metrics.registry.get_sample_value("unlearnd_serve_loads_total", {"kind": "full"}) == 1


@pytest.mark.parametrize("change", [{"act": nn.Tanh}, {"scale": 2.0}])
def test_a_different_architecture_or_constant_is_loaded_in_full(tmp_path: Path, change: dict) -> None:
    """Tanh instead of ReLU has the same parameters, a new scale the same code: both are new computations."""
    h, _ = holder(tmp_path)
    h.swap_to(publish(tmp_path, seed=1).version)
    h.swap_to(publish(tmp_path, seed=2).version)
    info = publish(tmp_path, seed=3, **change)
    result = h.swap_to(info.version)
    assert result.outcome == "swapped" and result.kind == "full"
    assert torch.equal(served_output(h, X), alone(info, X))
    back = publish(tmp_path, seed=4)             # and back to the first architecture: full again
    assert h.swap_to(back.version).kind == "full"
    assert torch.equal(served_output(h, X), alone(back, X))


def _rehash(info: registry.VersionInfo, name: str) -> None:
    """Make the manifest match a file that was changed (so only deeper checks can catch it)."""
    manifest = json.loads((info.path / registry.MANIFEST_FILE).read_text())
    data = (info.path / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (info.path / registry.MANIFEST_FILE).write_text(json.dumps(manifest))


def _flip_storage_byte(path: Path) -> None:
    """Change one byte of a tensor's data inside model.pt, leaving the zip's CRC-32 stale."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        entry = next(i for i in zf.infolist() if i.filename.endswith("/data/2"))
    # the local header's name and extra-field lengths (its extra field is torch's alignment padding)
    name_len, extra_len = (int.from_bytes(data[entry.header_offset + k:entry.header_offset + k + 2], "little")
                           for k in (26, 28))
    offset = entry.header_offset + 30 + name_len + extra_len
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["safetensors", "model.pt", "model.pt rehashed"])
def test_a_corrupted_version_is_refused_and_the_old_one_keeps_serving(tmp_path: Path, fault: str) -> None:
    h, metrics = holder(tmp_path)
    h.swap_to(publish(tmp_path, seed=1).version)
    good = publish(tmp_path, seed=2)
    assert h.swap_to(good.version).kind == "weights"
    bad = publish(tmp_path, seed=3)
    if fault == "safetensors":
        path = bad.path / registry.STATE_DICT_FILE
        path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    else:
        _flip_storage_byte(bad.path / registry.TORCHSCRIPT_FILE)
        if fault == "model.pt rehashed":         # the manifest agrees; its tensors (and the zip's CRC-32) do not
            _rehash(bad, registry.TORCHSCRIPT_FILE)
    result = h.swap_to(bad.version)
    assert result.outcome == "failed"
    assert result.error.reason == ("mismatch" if fault == "model.pt rehashed" else "verification")
    assert h.current.version == good.version and torch.equal(served_output(h, X), alone(good, X))
    assert metrics.registry.get_sample_value("unlearnd_serve_swaps_total", {"outcome": "failed"}) == 1
    after = publish(tmp_path, seed=4)            # the next good version still swaps by its weights
    assert h.swap_to(after.version).kind == "weights"
    assert torch.equal(served_output(h, X), alone(after, X))


def test_requests_during_weight_swaps_get_the_output_of_the_version_they_name(tmp_path: Path) -> None:
    """Double buffering: a request's module is never written under it, so each output matches its version."""
    h, _ = holder(tmp_path)
    infos = [publish(tmp_path, seed=s) for s in range(1, 13)]
    expected = {i.version: alone(i, X) for i in infos}
    h.swap_to(infos[0].version)
    seen: list[tuple[int, torch.Tensor]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            served = h.current
            seen.append((served.version, served.infer(X)))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for info in infos[1:]:
            assert h.swap_to(info.version).kind == "weights"
        deadline = time.monotonic() + 10
        while not any(v == infos[-1].version for v, _ in seen[-6:]) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert {v for v, _ in seen} >= {infos[0].version, infos[-1].version}
    for version, out in seen:
        assert torch.equal(out, expected[version]), version


def test_layout_signature_ignores_trace_names_and_sees_the_computation(tmp_path: Path) -> None:
    a, b = publish(tmp_path, seed=1), publish(tmp_path, seed=2)
    c = publish(tmp_path, seed=3, act=nn.Tanh)
    la, lb, lc = (read_layout((i.path / registry.TORCHSCRIPT_FILE).read_bytes()) for i in (a, b, c))
    names = [zipfile.ZipFile(i.path / registry.TORCHSCRIPT_FILE).namelist() for i in (a, b)]
    assert names[0] != names[1]                  # each trace in a process names its classes anew
    assert la.signature == lb.signature != lc.signature
    assert read_layout(b"not a zip") is None


def test_double_buffering_reuses_the_previous_module_once_no_request_holds_its_version(tmp_path: Path) -> None:
    h, _ = holder(tmp_path)
    h.swap_to(publish(tmp_path, seed=1).version)
    module_1 = h.current.module
    assert h.swap_to(publish(tmp_path, seed=2).version).kind == "weights"     # into a copy of module 1
    module_2 = h.current.module
    assert module_2 is not module_1
    held = h.current                       # a request still holding version 2 ...
    assert h.prepare_standby()             # ... does not stop version 1's module from becoming the standby
    info = publish(tmp_path, seed=3)
    assert h.swap_to(info.version).kind == "weights"
    assert h.current.module is module_1 and torch.equal(served_output(h, X), alone(info, X))
    assert not h.prepare_standby()         # version 2 is still held: its module is not written, not copied
    info = publish(tmp_path, seed=4)
    assert h.swap_to(info.version).kind == "weights"   # the load copies the served module instead
    assert h.current.module not in (module_1, module_2)
    assert held.module is module_2 and torch.equal(held.infer(X), alone(registry_info(tmp_path, 2), X))
    assert torch.equal(served_output(h, X), alone(info, X))


def registry_info(root: Path, version: int) -> registry.VersionInfo:
    return registry.verify_version(root, NAME, version)


def test_polling_runs_full_loads_on_a_low_priority_loader_thread_and_weight_loads_itself(tmp_path: Path) -> None:
    import os

    from daemon.serving.watcher import Watcher

    h, _ = holder(tmp_path)
    watcher = Watcher(h, interval_s=0.05, load_nice=5)
    seen: list[tuple[str, str, int]] = []
    original = h._warm_up

    def record(served, calls):  # the real warm-up, noting which thread ran it at which priority
        tid = threading.get_native_id()
        seen.append((served.load_kind, threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, tid)))
        return original(served, calls)

    h._warm_up = record
    try:
        publish(tmp_path, seed=1)
        assert watcher.check().kind == "full"
        publish(tmp_path, seed=2)
        assert watcher.check().kind == "weights"
        publish(tmp_path, seed=3, act=nn.Tanh)
        assert watcher.check(force=True).kind == "full"    # an explicit reload: at normal priority
    finally:
        watcher.stop()
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    (k1, t1, n1), (k2, t2, n2), (k3, t3, n3) = seen
    assert (k1, k2, k3) == ("full", "weights", "full")
    assert t1.startswith("unlearnd-loader") and n1 == min(19, base + 5)
    assert t2 == t3 == threading.current_thread().name and n2 == n3 == base


def test_loads_run_with_a_short_gil_switch_interval_and_restore_it(tmp_path: Path) -> None:
    """While a version loads, the GIL switch interval is short (requests wait less behind the load's
    Python work); afterwards, whether the load succeeded or was refused, it is what it was."""
    import sys

    from daemon.serving import holder as holder_module

    h, _ = holder(tmp_path)
    seen: list[float] = []
    original = h._warm_up

    def record(served, calls):  # the real warm-up, noting the switch interval it ran under
        seen.append(sys.getswitchinterval())
        return original(served, calls)

    h._warm_up = record
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        publish(tmp_path, seed=1)
        assert h.swap_to(1).kind == "full"
        publish(tmp_path, seed=2)
        assert h.swap_to(2).kind == "weights"
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        bad = publish(tmp_path, seed=3)
        path = bad.path / registry.STATE_DICT_FILE
        path.write_bytes(path.read_bytes()[:-1] + b"\x00")
        assert h.swap_to(bad.version).outcome == "failed"
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)
    assert seen == [pytest.approx(holder_module._LOAD_SWITCH_INTERVAL_S)] * 2
    assert h.current.version == 2
