"""structlog set-up shared by ``unlearnd run`` and ``unlearnd serve``: JSON lines on standard error.

Set up once per process, before the first event; ``fmt="console"`` renders for people instead. The
standard library's loggers (uvicorn, kafka-python) write to the same stream at the same level, except
kafka-python, which is held at ERROR: it is noisy while the broker is away.
"""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _CurrentStderr:
    """``sys.stderr`` as it is at each write, not as it was when logging was set up: whoever replaced it since (a
    supervisor's redirection, a test's capture that has ended) must not turn a log line into a crash."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """structlog on standard error at ``level`` (debug, info, warning, error), rendered as ``fmt`` (json, console)."""
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {', '.join(_LEVELS)}, got {level!r}")
    if fmt not in ("json", "console"):
        raise ValueError(f"fmt must be json or console, got {fmt!r}")
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=sys.stderr, level=_LEVELS[level], format="%(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
