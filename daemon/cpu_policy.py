"""The CPU scheduling policy of the calling thread: how background work yields to latency-bound work.

An unlearning round is seconds of CPU; a server answering requests on the same host needs its CPU within a
millisecond. Lowering the round's nice value does not keep it off the server's cores on Linux's EEVDF
scheduler (a woken request thread still waits out the running task's slice); ``SCHED_IDLE`` does: the
thread runs only on CPU time that nothing else wants, and gets all of it on an otherwise idle host. On Linux
the policy is per thread, and threads the thread starts later (torch's intra-op workers among them) inherit it.
"""

from __future__ import annotations

import os

__all__ = ["POLICIES", "set_thread_policy", "thread_policy"]

POLICIES = ("normal", "batch", "idle")
_CODES = {"normal": os.SCHED_OTHER, "batch": getattr(os, "SCHED_BATCH", None), "idle": getattr(os, "SCHED_IDLE", None)}


def set_thread_policy(policy: str) -> bool:
    """Run the calling thread under ``policy`` (one of ``POLICIES``); its nice value is kept.

    Returns whether it now does: False where the OS lacks the policy (it then runs as before).
    """
    if policy not in _CODES:
        raise ValueError(f"CPU policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    code = _CODES[policy]
    if code is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, code, os.sched_param(0))
    except OSError:
        return False
    return os.sched_getscheduler(0) == code


def thread_policy() -> str | None:
    """The calling thread's policy by name (``None``: one this module does not set, or unknown here)."""
    if not hasattr(os, "sched_getscheduler"):
        return None
    code = os.sched_getscheduler(0)
    return next((name for name, c in _CODES.items() if c == code), None)
