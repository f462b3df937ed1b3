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
    """The connections of one server, in the order they started waiting (oldest first), and the hooks.

    ``on_reject(status)`` counts an answer the guard wrote; ``on_drop(reason)`` counts a connection closed
    without one (evicted, refused); ``headers()`` gives the app's version headers.
    """

    def __init__(self, limits: ConnectionLimits, *, on_reject: Callable[[int], None] = lambda status: None,
                 on_drop: Callable[[str], None] = lambda reason: None,
                 headers: Callable[[], dict[str, str]] = dict) -> None:
        self.limits = limits
        self.on_reject = on_reject
        self.on_drop = on_drop
        self.headers = headers
        self.waiting: OrderedDict[Any, None] = OrderedDict()   # reading a request, or lingering after an answer
        self.idle: OrderedDict[Any, None] = OrderedDict()      # keep-alive, between requests
        self.open = 0

    def place(self, conn: Any, queue: OrderedDict[Any, None] | None) -> None:
        """Move ``conn`` to the end of ``queue`` (None: neither, its request is being answered)."""
        self.waiting.pop(conn, None)
        self.idle.pop(conn, None)
        if queue is not None:
            queue[conn] = None

    def victim(self, newcomer: Any) -> Any | None:
        for queue in (self.waiting, self.idle):
            for conn in queue:
                if conn is not newcomer:
                    return conn
        return None


def _answer(status: int, message: str, headers: dict[str, str]) -> bytes:
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    lines += [f"{k.lower()}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of ``GuardState`` (one subclass per server)."""

    guard: GuardState

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        g = self.guard
        g.open += 1
        self._phase = "head"
        self._head_bytes = 0
        self._body_bytes = 0
        self._message_done = True
        self._closing = False
        self._deadline: asyncio.TimerHandle | None = None
        g.place(self, g.waiting)
        self._arm(g.limits.header_timeout_s, 408, "the request headers did not arrive within "
                                                 f"{g.limits.header_timeout_s:g} s")
        if g.open > g.limits.max_connections:
            victim = g.victim(self)
            if victim is not None:
                victim._drop("evicted")
            else:
                self._reject(503, f"the server holds {g.limits.max_connections} connections, all busy; retry")

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open -= 1
        self.guard.place(self, None)
        self._disarm()
        super().connection_lost(exc)

    # -- timers -----------------------------------------------------------------------------------------
    def _arm(self, seconds: float, status: int, message: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, status, message)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, status: int, message: str) -> None:
        self._deadline = None
        if self._closing:
            self.transport.abort()
        elif self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.close()          # the app is answering: let it, then close (below)
        elif self.cycle is not None and self.cycle.response_started:
            self.transport.close()          # answered before reading its body; the body never came
        else:
            self._reject(status, message)

    # -- ending a connection ----------------------------------------------------------------------------
    def _reject(self, status: int, message: str) -> None:
        """Answer ``status`` now, count it, stop parsing, half-close and drop what still arrives."""
        if self._closing or self.transport.is_closing():
            return
        self._closing = True
        self.guard.on_reject(status)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True      # the app (if it runs) has nobody to answer
            self.cycle.message_event.set()
        self.transport.write(_answer(status, message, self.guard.headers()))
        self.guard.place(self, self.guard.waiting)
        if self.guard.limits.linger_s > 0 and self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self._arm(self.guard.limits.linger_s, status, message)   # _expired aborts a closing connection
        else:
            self.transport.close()

    def _drop(self, reason: str) -> None:
        """Close at once, with no answer (a reset frees the socket immediately)."""
        self.guard.on_drop(reason)
        self.guard.place(self, None)
        self._closing = True
        self.transport.abort()

    def eof_received(self) -> bool | None:
        if self._closing:
            self.transport.close()
        return None

    # -- parsing ----------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._closing:
            return                               # lingering: read and dropped
        if self._phase == "head":
            self._head_bytes += len(data)
        super().data_received(data)
        limit = self.guard.limits.max_header_bytes
        if self._phase == "head" and self._head_bytes > limit and not self._closing:
            self._reject(431, f"the request headers exceed {limit} bytes")

    def on_message_begin(self) -> None:
        if self._phase == "idle":                # a keep-alive connection's next request starts
            g = self.guard
            self._phase = "head"
            self._head_bytes = 0
            g.place(self, g.waiting)
            self._arm(g.limits.header_timeout_s, 408, "the request headers did not arrive within "
                                                     f"{g.limits.header_timeout_s:g} s")
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
        self._phase = "body"
        self._arm(g.limits.body_timeout_s, 408, f"the request body did not arrive within {g.limits.body_timeout_s:g} s")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._closing:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.guard.limits.max_body_bytes:
            if self.cycle is not None and self.cycle.response_started:
                self.transport.close()
            else:
                self._reject(413, f"request body exceeds the limit of {self.guard.limits.max_body_bytes} bytes")
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        self._message_done = True
        if self._phase == "body":
            self._disarm()
            if self.cycle is not None and self.cycle.response_complete:   # answered before its body ended
                self._phase = "idle"
                self.guard.place(self, self.guard.idle)
            else:
                self._phase = "busy"
                self.guard.place(self, None)
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if not self._closing and self._message_done and not self.transport.is_closing():
            self._phase = "idle"
            self.guard.place(self, self.guard.idle)
        super().on_response_complete()


def guarded_protocol(state: GuardState) -> type[HttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` bound to ``state``."""
    return type("GuardedHttpToolsProtocol", (_GuardedProtocol,), {"guard": state})
