"""A short CPU scheduler slice for the threads that serve requests (Linux 6.12+ EEVDF custom slices).

Under the EEVDF scheduler, a thread woken by a request (the event loop on a new connection's bytes, an
inference thread given a request) preempts the running task at once only if its slice is shorter; with the
default slice (~1.4 ms here) it may wait for the running task's slice to run out first. Any CPU work that
shares the cores — a publisher exporting a version, the server's own version loads, another service — then
adds up to a slice to each hop of a request, and a request takes several (measured on the 2-core benchmark
machine: 26% of the requests sent while a co-located publisher exported a version were slowed past 5 ms with
the default slice, 4.5% with 0.3 ms). A thread's slice is set with ``sched_setattr(2)``'s ``sched_runtime``
for ``SCHED_OTHER`` (kernels before 6.12 ignore it: then nothing changes). It is a request's promptness,
not its share: the thread's nice value and CPU share are unchanged.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

__all__ = ["set_thread_slice", "thread_slice_us"]

# sched_setattr / sched_getattr syscall numbers
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275), "arm64": (274, 275)}
# struct sched_attr (SCHED_ATTR_SIZE_VER1): size, policy, flags, nice, priority, runtime, deadline, period,
# util_min, util_max
_ATTR = struct.Struct("IIQiIQQQII")
_FAIR_POLICIES = (os.SCHED_OTHER, getattr(os, "SCHED_BATCH", 3))


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _get(libc: ctypes.CDLL, nr_get: int, tid: int) -> tuple[int, ...] | None:
    buf = ctypes.create_string_buffer(_ATTR.size)
    if libc.syscall(nr_get, tid, buf, _ATTR.size, 0) != 0:
        return None
    return _ATTR.unpack(buf.raw)


def thread_slice_us(tid: int = 0) -> float | None:
    """The scheduler slice of thread ``tid`` (0: the calling thread) in µs, or ``None`` where unknown."""
    nrs = _SYSCALLS.get(platform.machine())
    libc = _libc()
    if nrs is None or libc is None:
        return None
    attr = _get(libc, nrs[1], tid)
    return None if attr is None else attr[5] / 1e3


def set_thread_slice(us: int, tid: int = 0) -> bool:
    """Give thread ``tid`` (0: the calling thread; threads and processes it starts later inherit it) a
    scheduler slice of ``us`` µs (0: the kernel's default); its policy and nice value are kept. Returns
    whether the kernel now reports that slice (False: unsupported here, or not a fair-scheduled thread)."""
    nrs = _SYSCALLS.get(platform.machine())
    libc = _libc()
    if nrs is None or libc is None:
        return False
    current = _get(libc, nrs[1], tid)
    if current is None or current[1] not in _FAIR_POLICIES:
        return False
    _, policy, _, nice, priority, *_ = current
    buf = ctypes.create_string_buffer(_ATTR.pack(_ATTR.size, policy, 0, nice, priority, us * 1000, 0, 0, 0, 0),
                                      _ATTR.size)
    if libc.syscall(nrs[0], tid, buf, 0) != 0:
        return False
    after = _get(libc, nrs[1], tid)
    return after is not None and (us == 0 or after[5] == us * 1000)
