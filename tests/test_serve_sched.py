"""The request threads' short scheduler slice (``daemon.serving.sched``): set per thread, inherited by what the
thread starts, reset for background work, and applied by a real ``unlearnd serve`` process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from daemon import registry
from daemon.serving.sched import set_thread_slice, thread_slice_us
from daemon.serving.settings import ServeSettings

REPO = Path(__file__).resolve().parents[1]


def in_thread(fn):  # noqa: ANN001, ANN201 - run fn on a fresh thread (a thread's slice is its own), return its result
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def supported() -> bool:
    return in_thread(lambda: set_thread_slice(300))


needs_slices = pytest.mark.skipif(not supported(), reason="this kernel has no custom EEVDF slices (Linux < 6.12)")


@needs_slices
def test_a_thread_s_slice_is_set_kept_inherited_and_reset() -> None:
    def body() -> tuple:
        default = thread_slice_us()
        assert set_thread_slice(300)
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child = in_thread(thread_slice_us)                    # a thread it starts inherits the slice
        proc = subprocess.run([sys.executable, "-c", "from daemon.serving.sched import thread_slice_us as s; "
                               "print(s())"], capture_output=True, text=True, env={**os.environ,
                               "PYTHONPATH": str(REPO)}, check=True)
        mine = thread_slice_us()
        assert set_thread_slice(0)
        return default, mine, child, float(proc.stdout), thread_slice_us(), nice

    default, mine, child, process, reset, nice = in_thread(body)
    assert mine == child == process == 300.0
    assert reset == default != 300.0
    assert nice == os.getpriority(os.PRIO_PROCESS, 0)     # the nice value is kept


def test_settings_refuse_a_slice_the_kernel_would_clamp() -> None:
    for bad in (50, 200_000, -1, True):
        with pytest.raises(ValueError, match="request_slice_us"):
            ServeSettings(registry=Path("/tmp"), model="m", request_slice_us=bad)
    assert ServeSettings(registry=Path("/tmp"), model="m", request_slice_us=0).request_slice_us == 0


@needs_slices
@pytest.mark.parametrize("flag, expected", [((), 300.0), (("--request-slice-us", "0"), None)])
def test_the_server_s_threads_run_with_the_short_slice_and_its_helper_without(tmp_path: Path, flag: tuple,
                                                                            expected: float | None) -> None:
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)).eval()
    registry.write_version(tmp_path, "m", module, input_shape=(1, 8, 8), classes=["a", "b", "c"], parent=None)
    default = in_thread(thread_slice_us)
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve", "--registry", str(tmp_path), "--model",
                             "m", "--port", "0", *flag], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        lines: list[str] = []
        while time.monotonic() < deadline and not any('"serve_started"' in line for line in lines):
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
        assert any('"serve_started"' in line for line in lines), "".join(lines)
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        slices = {tid: thread_slice_us(tid) for tid in tids}
        assert slices[proc.pid] == (expected or default)                  # the event loop's thread
        children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        children += [int(c) for t in tids for c in Path(f"/proc/{proc.pid}/task/{t}/children").read_text().split()]
        helpers = {c for c in children if b"daemon.serving.verifier" in Path(f"/proc/{c}/cmdline").read_bytes()}
        assert helpers and all(thread_slice_us(c) == default for c in helpers)   # background work: default
    finally:
        proc.terminate()
        proc.wait(timeout=30)
