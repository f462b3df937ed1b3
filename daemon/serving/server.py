"""Run ``unlearnd serve``: build the pieces, connect them, and hand the app to uvicorn.

One process serves one model: uvicorn's event loop takes the HTTP, a thread pool runs the inferences,
and a watcher thread follows ``LATEST``. Scale out with replicas (one process each, own port or host)
behind a load balancer; each replica holds its own lease, so retention keeps every served version.
"""

from __future__ import annotations

import gc
import sys

import structlog
import torch
import uvicorn

from daemon.logs import configure_logging
from daemon.serving.app import build_app
from daemon.serving.holder import ModelHolder
from daemon.serving.metrics import ServeMetrics
from daemon.serving.sched import set_thread_slice, thread_slice_us
from daemon.serving.settings import ServeSettings
from daemon.serving.watcher import Watcher

__all__ = ["run"]

_SWITCH_INTERVAL_S = 0.0005


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
                      lease_ttl_s=settings.lease_ttl_s, load_nice=settings.load_nice)
    app = build_app(settings, holder, watcher, metrics)
    return app, holder, watcher, metrics


class _Server(uvicorn.Server):
    """uvicorn re-raises the stopping signal once it has shut down (so the process dies *by* SIGTERM);
    for unlearnd a SIGTERM or SIGINT is the clean stop of contract §7: exit code 0."""

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        self._captured_signals.clear()   # uvicorn's own list (0.29+); nothing is re-raised


def _stack() -> tuple[str, str]:
    """uvicorn's HTTP parser and event loop: httptools and uvloop (dependencies) when importable, else the
    pure-Python h11 and asyncio. They cut the server's CPU per small request by about 30% (1.17 -> 0.83 ms
    measured), which is what a request queues behind when a version loads or another process takes a core."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return http, loop


def run(settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT (uvicorn's handlers); returns the exit code."""
    configure_logging(settings.log_level, settings.log_format)
    torch.set_num_threads(settings.torch_threads)
    app, _, _, _ = build(settings)
    # torch, numpy and the web stack leave ~180k long-lived objects; a full collection walks them all
    # (~100 ms on this CPU, every ~15 s under load: the worst latency spike). Freezing them after the
    # imports keeps them out of every collection; versions loaded later stay collectable.
    gc.collect()
    gc.freeze()
    # A request takes the GIL several times (event loop, inference thread, event loop); while a version
    # loads on another thread, each hand-off can wait a whole switch interval (5 ms by default).
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    http, loop = _stack()
    # The event loop (this thread) and the threads started from here on: a short scheduler slice, so a woken
    # request thread preempts other CPU work at once instead of waiting out its slice (daemon.serving.sched).
    slice_set = set_thread_slice(settings.request_slice_us) if settings.request_slice_us else False
    structlog.get_logger("unlearnd.serve").info("request_slice", us=settings.request_slice_us, applied=slice_set,
                                                slice_us=thread_slice_us())
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, lifespan="on", log_config=None,
        access_log=settings.access_log, log_level=settings.log_level, server_header=False,
        timeout_keep_alive=30, timeout_graceful_shutdown=5, http=http, loop=loop,
    )
    structlog.get_logger("unlearnd.serve").info("http_stack", http=http, loop=loop)
    server = _Server(config)
    server.run()
    # uvicorn sets should_exit on a signal; a failed start (port in use) leaves started False.
    return 0 if server.started else 1
