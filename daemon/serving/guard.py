"""Connection limits of ``unlearnd serve``: no client can hold the server's sockets or memory for long.

uvicorn on its own waits forever for a connection's first request (its keep-alive timeout starts only after
a response), lets headers grow without bound, and leaves body sizes to the app. ``guarded_protocol`` wraps
its httptools protocol with, per connection:

- **headers**: at most ``max_header_bytes``, all within ``header_timeout_s`` of the connection opening (or of
  the first byte of a later request): otherwise 431 or 408, and the connection closes.
- **body**: a ``Content-Length`` over ``max_body_bytes`` is answered 413 as soon as the headers end, before any
  byte of the body is read (a claim of 1 GiB costs nothing); a chunked body is cut off at the limit the same
  way; the whole body must arrive within ``body_timeout_s`` of the headers, else 408.
- **connections**: at most ``max_connections`` open at once. A new connection over the cap closes the one
  that has waited longest for its request to arrive (a slow or stalled client), then, if none waits, the
  longest-idle keep-alive connection; connections whose request is being answered are never closed. Only
  when every connection is busy is the new one refused (503). A legitimate client sends its request within
  milliseconds of connecting, so it is always the newest waiter and never the one closed.

Answers it writes itself (408, 413, 431, 503) are JSON ``{"error": ...}`` like the app's, carry the app's
version headers, and are counted through ``on_reject`` (so ``unlearnd_serve_requests_total`` sees them). After
such an answer the connection is half-closed and what the client still sends is read and dropped for at
most ``linger_s`` (so the client reads the answer instead of a reset), then closed.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ConnectionLimits", "GuardState", "guarded_protocol"]

_QUEUES = ("head", "body", "linger", "idle")
_TICK_S = 0.025
_REAP_BUDGET = 128
_REASONS = {408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may take (see the module docstring)."""

    max_body_bytes: int
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 4096
    linger_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if not self.linger_s >= 0:
            raise ValueError(f"linger_s must be >= 0 seconds, got {self.linger_s!r}")


class GuardState:
    """The connections of one server in four queues, each oldest first, and the hooks.

    ``head`` (waiting for a request's headers), ``body`` (for its body) and ``linger`` (answered by the guard,
    draining before the close) map a connection to its deadline; ``idle`` (keep-alive, between requests) to when
    it became idle. A connection whose request is being answered is in none. Deadlines are enforced by one reaper
    every ``_TICK_S`` that handles at most ``_REAP_BUDGET`` expired connections per tick: 6,000 connections
    opened in one burst expire together, and answering them all in one go would hold the event loop (and every
    legitimate request) for a second; spread over ticks, each tick costs milliseconds.

    ``on_reject(status)`` counts an answer the guard wrote; ``on_drop(reason)`` counts a connection closed
    without one (evicted); ``headers()`` gives the app's version headers.
    """

    def __init__(self, limits: ConnectionLimits, *, on_reject: Callable[[int], None] = lambda status: None,
                 on_drop: Callable[[str], None] = lambda reason: None,
                 headers: Callable[[], dict[str, str]] = dict) -> None:
        self.limits = limits
        self.on_reject = on_reject
        self.on_drop = on_drop
        self.headers = headers
        self.queues: dict[str, OrderedDict[Any, float]] = {name: OrderedDict() for name in _QUEUES}
        self.open = 0
        self._reaping = False

    def place(self, conn: Any, queue: str | None, at: float = 0.0) -> None:
        """Move ``conn`` to the end of ``queue`` with deadline (or idle time) ``at``; None: in no queue."""
        if conn._queue is not None:
            self.queues[conn._queue].pop(conn, None)
        conn._queue = queue
        if queue is not None:
            self.queues[queue][conn] = at

    def victim(self, newcomer: Any) -> Any | None:
        """The connection to close for a new one: lingering first, then the one waiting longest for its request
        (headers or body), then the longest idle; never one being answered."""
        fronts = []
        for name, timeout in (("linger", 1e9), ("head", self.limits.header_timeout_s),
                              ("body", self.limits.body_timeout_s)):
            for conn, deadline in self.queues[name].items():
                if conn is not newcomer:
                    fronts.append((deadline - timeout, conn))
                break
        if fronts:
            return min(fronts, key=lambda f: f[0])[1]
        return next((c for c in self.queues["idle"] if c is not newcomer), None)

    def start_reaper(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._reaping:
            self._reaping = True
            loop.call_later(_TICK_S, self._reap, loop)

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        budget = _REAP_BUDGET
        for name in ("linger", "head", "body"):
            queue = self.queues[name]
            while queue and budget > 0:
                conn, deadline = next(iter(queue.items()))
                if deadline > now:
                    break
                budget -= 1
                try:
                    conn._expired(name)
                finally:
                    if conn._queue == name:       # whatever happened, it leaves this queue's front
                        self.place(conn, None)
        loop.call_later(_TICK_S, self._reap, loop)


def _answer(status: int, message: str, headers: dict[str, str]) -> bytes:
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    lines += [f"{k.lower()}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of ``GuardState`` (one subclass per server)."""

    guard: GuardState
    _queue: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        g = self.guard
        g.start_reaper(self.loop)
        g.open += 1
        self._head_bytes = 0
        self._body_bytes = 0
        self._message_done = True
        self._closing = False
        g.place(self, "head", self.loop.time() + g.limits.header_timeout_s)
        if g.open > g.limits.max_connections:
            victim = g.victim(self)
            if victim is not None:
                victim._drop("evicted")
            else:
                self._reject(503, f"the server holds {g.limits.max_connections} connections, all busy; retry")

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open -= 1
        self.guard.place(self, None)
        super().connection_lost(exc)

    # -- deadlines (GuardState's reaper calls this) -----------------------------------------------------
    def _expired(self, queue: str) -> None:
        if queue == "linger" or self._closing:
            self.guard.place(self, None)
            self.transport.abort()
        elif self.cycle is not None and self.cycle.response_started:
            self.guard.place(self, None)      # answered before its body ended; the body never came
            self.transport.close()
        elif queue == "head":
            self._reject(408, f"the request headers did not arrive within {self.guard.limits.header_timeout_s:g} s")
        else:
            self._reject(408, f"the request body did not arrive within {self.guard.limits.body_timeout_s:g} s")

    # -- ending a connection ----------------------------------------------------------------------------
    def _reject(self, status: int, message: str) -> None:
        """Answer ``status`` now, count it, stop parsing, half-close and drop what still arrives."""
        if self._closing or self.transport.is_closing():
            return
        g = self.guard
        self._closing = True
        g.on_reject(status)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True      # the app (if it runs) has nobody to answer
            self.cycle.message_event.set()
        self.transport.write(_answer(status, message, g.headers()))
        if g.limits.linger_s > 0 and self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            g.place(self, "linger", self.loop.time() + g.limits.linger_s)
        else:
            g.place(self, None)
            self.transport.close()

    def _drop(self, reason: str) -> None:
        """Close at once, with no answer (a reset frees the socket immediately)."""
        self.guard.on_drop(reason)
        self.guard.place(self, None)
        self._closing = True
        self.transport.abort()

    def eof_received(self) -> bool | None:
        if self._closing:
            self.guard.place(self, None)
            self.transport.close()
        return None

    # -- parsing ----------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._closing:
            return                               # lingering: read and dropped
        heading = self._queue == "head"
        if heading:
            self._head_bytes += len(data)
        super().data_received(data)
        limit = self.guard.limits.max_header_bytes
        if heading and self._queue == "head" and self._head_bytes > limit and not self._closing:
            self._reject(431, f"the request headers exceed {limit} bytes")

    def on_message_begin(self) -> None:
        if self._queue == "idle":                # a keep-alive connection's next request starts
            g = self.guard
            self._head_bytes = 0
            g.place(self, "head", self.loop.time() + g.limits.header_timeout_s)
        self._message_done = False
        self._body_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._closing:
            return
        g = self.guard
        declared = next((v for k, v in self.headers if k == b"content-length"), None)
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size > g.limits.max_body_bytes:
                self._reject(413, f"request body of {size} bytes exceeds the limit of "
                                  f"{g.limits.max_body_bytes} bytes")
                return
        g.place(self, "body", self.loop.time() + g.limits.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._closing:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.guard.limits.max_body_bytes:
            if self.cycle is not None and self.cycle.response_started:
                self.guard.place(self, None)
                self.transport.close()
            else:
                self._reject(413, f"request body exceeds the limit of {self.guard.limits.max_body_bytes} bytes")
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        self._message_done = True
        if self._queue == "body":
            if self.cycle is not None and self.cycle.response_complete:   # answered before its body ended
                self.guard.place(self, "idle", self.loop.time())
            else:
                self.guard.place(self, None)      # being answered
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if not self._closing and self._message_done and not self.transport.is_closing():
            self.guard.place(self, "idle", self.loop.time())
        super().on_response_complete()


def guarded_protocol(state: GuardState) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` bound to ``state``."""
    return type("GuardedHttpToolsProtocol", (_GuardedProtocol,), {"guard": state})
