"""Follow ``LATEST``: poll it on a background thread, or check at once when a reload is requested.

The watcher also keeps this server's lease in the registry (``daemon.registry.ops``): it names the version
served and, while a load is in progress, the version being loaded, so retention deletes neither.

``LATEST`` only moves forward: one that names a version older than the newest served (by this server, or,
before its first swap, by any server whose lease is in the registry) is refused with reason ``backwards``,
and the newer version keeps serving; a rollback is published as a new version (``registry_ops.rollback``).

A version that failed to load is not retried by polling (that would reload and log it every interval);
an explicit reload (``POST /v2/repository/models/{name}/load``) retries it, and a newer ``LATEST`` moves on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from daemon import registry
from daemon.registry import ops as registry_ops
from daemon.serving.holder import LoadError, ModelHolder, ServedVersion, SwapResult

__all__ = ["Watcher", "lower_thread_priority"]

_log = structlog.get_logger("unlearnd.serve")


def lower_thread_priority(nice: int) -> None:
    """Give the calling thread (alone: Linux nices threads one by one) a lower CPU priority.

    A full load (deserialising, warming up) is CPU work that competes with the requests being served; at
    a higher nice value it takes the CPU the requests leave, so a swap costs them less.
    """
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    from daemon.serving.sched import set_thread_slice

    set_thread_slice(0)        # background work: the kernel's default slice, not the request threads' short one
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        _log.warning("thread_priority_unchanged", detail=str(exc))


class Watcher:
    """Polls ``LATEST`` every ``interval_s`` and swaps the holder to it.

    Arguments:
        holder: the served-version holder.
        interval_s: the polling interval (the fallback when nobody notifies).
        server_id: this server's lease name; ``None`` writes no lease.
        lease_ttl_s: how long a lease protects its versions without a refresh (refreshed every third).
        load_nice: how much lower the CPU priority of full loads found by polling is (0: unchanged). They
            run on a loader thread of their own; the polling thread, weight-only loads (a few ms) and
            explicit reloads keep normal priority, so a notified reload never waits behind a slow,
            low-priority load of the same version.
        sync: run before each read of ``LATEST``: with a registry on S3, brings the bucket's ``LATEST`` into the
            local cache the holder reads (``RegistryMirror.follow_latest``: hashes verified, never a half version).
            A failure (the object store unreachable) is logged once and the served version keeps serving.
    """

    def __init__(self, holder: ModelHolder, *, interval_s: float = 0.2, server_id: str | None = None,
                 lease_ttl_s: float = registry_ops.DEFAULT_LEASE_TTL_S, load_nice: int = 0,
                 sync: Callable[[], object] | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"poll interval must be > 0 seconds, got {interval_s!r}")
        if not lease_ttl_s > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {lease_ttl_s!r}")
        self.holder = holder
        self.interval_s = interval_s
        self.server_id = server_id
        self.lease_ttl_s = lease_ttl_s
        self.load_nice = load_nice
        self._failed: dict[int, str] = {}
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease_due = 0.0
        self._latest_error: str | None = None
        self._backwards: int | None = None        # the backwards LATEST refused last (logged once)
        self._lease_floor: int | None = None      # before the first swap: the newest version a lease names
        self._loader: ThreadPoolExecutor | None = None      # started by the first full load found by polling
        self.sync = sync
        self._sync_error: str | None = None

    # -- one check --------------------------------------------------------------------------------------
    def check(self, *, force: bool = False) -> SwapResult:
        """Read ``LATEST`` and swap to it if it differs from the served version.

        ``force`` retries a version that failed before (an operator's or publisher's explicit reload).
        """
        with self._check_lock:
            current = self.holder.current
            served = current.version if current else None
            self._sync()
            try:
                latest = registry.latest_version(self.holder.registry_dir, self.holder.model)
            except (registry.RegistryError, ValueError) as exc:
                if str(exc) != self._latest_error:     # log a broken LATEST once, not every interval
                    self._latest_error = str(exc)
                    self.holder.metrics.refused("registry")
                    _log.error("latest_unreadable", model=self.holder.model, detail=str(exc), serving=served)
                return SwapResult("failed", served, error=LoadError(None, "registry", str(exc)))
            self._latest_error = None
            if latest is None or latest == served:
                self._backwards = None
                return SwapResult("unchanged", served, attempted=latest)
            floor = self._high_water(served)
            if floor is not None and latest < floor:
                return self._refuse_backwards(latest, floor, served)
            self._backwards = None
            if not force and latest in self._failed:
                return SwapResult("failed", served, attempted=latest,
                                  error=LoadError(latest, "skipped", self._failed[latest]))
            self._lease(served, loading=latest)
            result = self.holder.swap_to(latest, run_full=None if force else self._run_full)
            if result.outcome == "failed" and result.error is not None:
                self._failed[latest] = f"{result.error.reason}: {result.error.detail}"
            elif result.outcome == "swapped":
                self._failed.pop(latest, None)
            self._lease(result.version)
            return result

    def _sync(self) -> None:
        """Bring the remote registry's ``LATEST`` into the local cache; a failure is logged once per message."""
        if self.sync is None:
            return
        try:
            self.sync()
            self._sync_error = None
        except Exception as exc:  # noqa: BLE001 - boto3's errors and ours alike: keep serving what is served
            detail = f"{type(exc).__name__}: {exc}"
            if detail != self._sync_error:
                self._sync_error = detail
                self.holder.metrics.refused("registry")
                _log.error("registry_sync_failed", model=self.holder.model, detail=detail)

    def _high_water(self, served: int | None) -> int | None:
        """The newest version known to have been served: this server's, else any lease's in the registry (so a
        restarted server still knows how far ``LATEST`` had got)."""
        if served is not None:
            return served
        if self._lease_floor is None:
            versions = [lease.version for lease in registry_ops.read_leases(self.holder.registry_dir,
                                                                             self.holder.model)
                        if lease.version is not None]
            self._lease_floor = max(versions, default=0)
        return self._lease_floor or None

    def _refuse_backwards(self, latest: int, floor: int, served: int | None) -> SwapResult:
        """``LATEST`` names a version older than one served: refuse it (counted and logged once per value)."""
        detail = (f"LATEST names version {latest}, older than version {floor} already served; a rollback is "
                  f"published as a new version (unlearnd registry rollback --to {latest})")
        if self._backwards != latest:
            self._backwards = latest
            self.holder.metrics.refused("backwards")
            _log.error("version_refused", model=self.holder.model, version=latest, reason="backwards",
                       detail=detail, serving=served)
        return SwapResult("failed", served, attempted=latest, error=LoadError(latest, "backwards", detail))

    def _run_full(self, load: Callable[[], ServedVersion]) -> ServedVersion:
        """Run a full load found by polling on the low-priority loader thread (and wait for it)."""
        if self.load_nice <= 0:
            return load()
        if self._loader is None:
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unlearnd-loader",
                                              initializer=lower_thread_priority, initargs=(self.load_nice,))
        return self._loader.submit(load).result()

    # -- lease ------------------------------------------------------------------------------------------
    def _lease(self, version: int | None, loading: int | None = None) -> None:
        if self.server_id is None:
            return
        try:
            registry_ops.write_lease(self.holder.registry_dir, self.holder.model, self.server_id,
                                     version=version, loading=loading, ttl_s=self.lease_ttl_s)
            self._lease_due = time.monotonic() + self.lease_ttl_s / 3
        except OSError as exc:       # a read-only registry mount: serve anyway, say so
            _log.warning("lease_write_failed", model=self.holder.model, detail=str(exc))

    def release(self) -> None:
        if self.server_id is None:
            return
        try:
            registry_ops.release_lease(self.holder.registry_dir, self.holder.model, self.server_id)
        except OSError as exc:
            _log.warning("lease_release_failed", model=self.holder.model, detail=str(exc))

    # -- the polling thread -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="unlearnd-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
                # the next weight-only load's target: copied here, between polls, not while a load waits
                self.holder.prepare_standby()
                if self.server_id is not None and time.monotonic() >= self._lease_due:
                    cur = self.holder.current
                    self._lease(cur.version if cur else None)
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad check; it is logged
                _log.exception("watcher_check_failed", model=self.holder.model)
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling and release the lease; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._loader = None
        self.release()
