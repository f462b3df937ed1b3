"""Run ``unlearnd serve``: build the pieces, connect them, and hand the app to uvicorn.

One process serves one model: uvicorn's event loop takes the HTTP, a thread pool runs the inferences,
and a watcher thread follows ``LATEST``. Scale out with replicas (one process each, own port or host)
behind a load balancer; each replica holds its own lease, so retention keeps every served version.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
from collections.abc import Callable

import structlog
import torch
import uvicorn

from daemon.logs import configure_logging
from daemon.serving.app import build_app, version_headers
from daemon.serving.guard import ConnectionLimits, GuardState, guarded_protocol
from daemon.serving.holder import ModelHolder
from daemon.serving.metrics import ServeMetrics
from daemon.serving.sched import set_thread_slice, thread_slice_us
from daemon.serving.settings import ServeSettings
from daemon.serving.watcher import Watcher

__all__ = ["run"]

_SWITCH_INTERVAL_S = 0.0005
# descriptors kept for everything but client connections: registry files, the verifier's pipes, logs
_FD_RESERVE = 256
# connections the kernel queues before the server accepts them; it caps this at net.core.somaxconn (4096 by
# default): a burst of connects beyond it has its SYNs dropped, and those clients retry after 1 s
_BACKLOG = 65535


def build(settings: ServeSettings):  # noqa: ANN201 - (app, holder, watcher, metrics)
    """The connected parts of a server, without starting anything (tests and the benchmark use it)."""
    from daemon.registry import ops as registry_ops

    from daemon.serving.verifier import Verifier

    metrics = ServeMetrics()
    verifier = (Verifier(nice=settings.verify_nice, idle=settings.verify_idle) if settings.verify_process
                else None)
    holder = ModelHolder(settings.registry, settings.model, metrics=metrics, verifier=verifier)
    server_id = settings.server_id or registry_ops.default_server_id(settings.port)
    watcher = Watcher(holder, interval_s=settings.poll_interval_s, server_id=server_id,
                      lease_ttl_s=settings.lease_ttl_s, load_nice=settings.load_nice, sync=_bucket_sync(settings))
    app = build_app(settings, holder, watcher, metrics)
    return app, holder, watcher, metrics


class _Server(uvicorn.Server):
    """uvicorn re-raises the stopping signal once it has shut down (so the process dies *by* SIGTERM);
    for unlearnd a SIGTERM or SIGINT is the clean stop of contract §7: exit code 0."""

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        self._captured_signals.clear()   # uvicorn's own list (0.29+); nothing is re-raised


def _bucket_sync(settings: ServeSettings) -> Callable[[], object] | None:
    """With ``registry_url`` on S3: what the watcher runs before each read of ``LATEST`` (pull it into the cache)."""
    if not settings.registry_url:
        return None
    from daemon.registry.mirror import open_mirror

    mirror = open_mirror(settings.registry_url, settings.registry, endpoint_url=settings.s3_endpoint_url,
                         region=settings.s3_region, check=False)
    return None if mirror is None else (lambda: mirror.follow_latest(settings.model))


def _stack() -> tuple[str, str]:
    """uvicorn's HTTP parser and event loop: httptools and uvloop (dependencies) when importable, else the
    pure-Python h11 and asyncio. They cut the server's CPU per small request by about 30% (1.17 -> 0.83 ms
    measured), which is what a request queues behind when a version loads or another process takes a core."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return http, loop


def open_files_limit() -> int:
    """Raise this process's open-files limit to its hard limit (as Go programs do) and return it: each
    connection holds one descriptor, and the soft default (often 1024) is far below what a server needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def connection_limits(settings: ServeSettings, open_files: int) -> ConnectionLimits:
    """The guard's limits; ``max_connections`` 0 means the open-files limit less a reserve."""
    cap = settings.max_connections or max(64, open_files - _FD_RESERVE)
    return ConnectionLimits(max_body_bytes=settings.max_body_bytes, max_header_bytes=settings.max_header_bytes,
                            header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
                            max_connections=cap)


def guard_state(settings: ServeSettings, holder: ModelHolder, metrics: ServeMetrics, open_files: int) -> GuardState:
    """The connection guard, counting what it answers in the server's metrics."""
    def on_reject(status: int) -> None:
        served = holder.current
        metrics.count(served.version if served else None, status)

    return GuardState(connection_limits(settings, open_files), on_reject=on_reject, on_drop=metrics.dropped,
                      headers=lambda: version_headers(holder.current))


def _tls_options(settings: ServeSettings) -> dict[str, object]:
    import ssl

    tls = settings.tls
    if not tls.enabled:
        return {}
    options: dict[str, object] = {"ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile)}
    if tls.client_cafile is not None:
        options["ssl_ca_certs"] = str(tls.client_cafile)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if tls.client_auth_required else ssl.CERT_OPTIONAL
    return options


def run(settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT (uvicorn's handlers); returns the exit code."""
    configure_logging(settings.log_level, settings.log_format)
    torch.set_num_threads(settings.torch_threads)
    log = structlog.get_logger("unlearnd.serve")
    open_files = open_files_limit()
    app, holder, _, metrics = build(settings)
    # torch, numpy and the web stack leave ~180k long-lived objects; a full collection walks them all
    # (~100 ms on this CPU, every ~15 s under load: the worst latency spike). Freezing them after the
    # imports keeps them out of every collection; versions loaded later stay collectable.
    gc.collect()
    gc.freeze()
    # A request takes the GIL several times (event loop, inference thread, event loop); while a version
    # loads on another thread, each hand-off can wait a whole switch interval (5 ms by default).
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    http, loop = _stack()
    # libuv (uvloop) accepts every pending connection in one go, and each gets its protocol built before the loop
    # turns to anything else: a burst of thousands of connects held every open request for over a second. One
    # accept per loop turn interleaves them with the requests already open (benchmarks/results/
    # serve_exhaustion_notes.md: attack p99 1.9 s -> 0.5 s, no SYN dropped). Read by libuv at listen time.
    os.environ.setdefault("UV_TCP_SINGLE_ACCEPT", "1")
    # The event loop (this thread) and the threads started from here on: a short scheduler slice, so a woken
    # request thread preempts other CPU work at once instead of waiting out its slice (daemon.serving.sched).
    slice_set = set_thread_slice(settings.request_slice_us) if settings.request_slice_us else False
    log.info("request_slice", us=settings.request_slice_us, applied=slice_set, slice_us=thread_slice_us())
    guard = guard_state(settings, holder, metrics, open_files)
    # The guard (header and body deadlines, size limits before reading, the connection cap) wraps httptools;
    # h11 (httptools missing) gets only uvicorn's own header-size bound.
    protocol = guarded_protocol(guard) if http == "httptools" else http
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, lifespan="on", log_config=None,
        access_log=settings.access_log, log_level=settings.log_level, server_header=False,
        timeout_keep_alive=30, timeout_graceful_shutdown=5, http=protocol, loop=loop,
        h11_max_incomplete_event_size=settings.max_header_bytes, backlog=_BACKLOG, **_tls_options(settings),
    )
    limits = guard.limits
    log.info("http_stack", http=http, loop=loop, tls=settings.tls.enabled,
             mutual_tls=settings.tls.client_cafile is not None, token=settings.token is not None,
             auth_inference=settings.auth_inference, guarded=http == "httptools",
             max_connections=limits.max_connections, open_files=open_files,
             header_timeout_s=limits.header_timeout_s, body_timeout_s=limits.body_timeout_s)
    server = _Server(config)
    server.run()
    # uvicorn sets should_exit on a signal; a failed start (port in use) leaves started False.
    return 0 if server.started else 1
