"""The daemon's ``/metrics`` endpoint: prometheus-client's exposition, with TLS, mutual TLS and a bearer token.

prometheus-client's ``start_http_server`` takes TLS files (``certfile``, ``keyfile``, ``client_cafile``,
``client_auth_required``) but no token, handshakes TLS on its accepting thread (one slow client stalls every
scrape) and starts a thread per connection without bound. This server keeps its exposition app
(``make_wsgi_app``) and adds what it lacks: the token check (401 with ``WWW-Authenticate: Bearer``), the
handshake and every read on the connection's own thread under a timeout, and a cap on connections served at
once (more are closed at once). Scrapes are a few per minute; the cap and timeout cost them nothing.
"""

from __future__ import annotations

import json
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from daemon.endpoint_auth import TlsFiles, check_bearer, read_token_file, server_ssl_context, unauthorized_header

__all__ = ["MetricsHttpServer", "check_endpoint_settings", "metrics_tls", "metrics_token", "notify_token",
           "start_metrics_server"]

#: a connection that sends nothing (or stalls its TLS handshake) for this long is closed
READ_TIMEOUT_S = 10.0
#: connections served at once; a scraper needs one
MAX_CONNECTIONS = 32


class _Handler(WSGIRequestHandler):
    timeout = READ_TIMEOUT_S        # StreamRequestHandler sets it on the socket before the first read

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass                         # scrapes are not worth a log line each


class MetricsHttpServer(socketserver.ThreadingMixIn, WSGIServer):
    """A threading WSGI server whose connections are bounded in number and time, optionally over TLS."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext | None) -> None:
        self._ctx = ctx
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)          # over the cap: closed at once
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            if self._ctx is not None:
                request.settimeout(READ_TIMEOUT_S)
                # the handshake runs here, on the connection's thread, bounded by the timeout
                request = self._ctx.wrap_socket(request, server_side=True)
            super().process_request_thread(request, client_address)
        except (OSError, ssl.SSLError):
            self.shutdown_request(request)
        finally:
            self._slots.release()


def _with_token(app: Callable[..., Iterable[bytes]], token: str) -> Callable[..., Iterable[bytes]]:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        presented = environ.get("HTTP_AUTHORIZATION")
        if check_bearer(presented, token):
            return app(environ, start_response)
        message = "wrong bearer token" if presented else "this endpoint needs Authorization: Bearer <token>"
        body = json.dumps({"error": f"{message} (metrics.token_file)"}).encode()
        start_response("401 Unauthorized", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                            ("WWW-Authenticate", unauthorized_header(presented, "unlearnd-daemon"))])
        return [body]
    return guarded


def metrics_tls(section: Any) -> TlsFiles:
    """``[metrics]``'s TLS files (a client CA means mutual TLS, required); ValueError when they do not fit."""
    return TlsFiles(certfile=section.tls_cert_file or None, keyfile=section.tls_key_file or None,
                    client_cafile=section.tls_client_ca_file or None,
                    client_auth_required=bool(section.tls_client_ca_file))


def metrics_token(section: Any) -> str | None:
    """``[metrics] token_file``'s token (None without one); ValueError naming the file, never the token."""
    return read_token_file(section.token_file, what="token file") if section.token_file else None


def notify_token(section: Any) -> str | None:
    """``[serving] notify_token_file``'s token (None without one)."""
    return read_token_file(section.notify_token_file, what="token file") if section.notify_token_file else None


def check_endpoint_settings(config: Any) -> tuple[str, str] | None:
    """(setting, problem) of the first unusable TLS or token file of ``[metrics]`` and ``[serving]``, or None:
    the files fit together, load, and hold a usable token (read, never shown)."""
    try:
        tls = metrics_tls(config.metrics)
    except ValueError as exc:
        return ("metrics.tls_key_file" if "key file" in str(exc) else "metrics.tls_cert_file"), str(exc)
    if tls.enabled:
        try:
            server_ssl_context(tls)
        except ValueError as exc:
            return "metrics.tls_cert_file", str(exc)
    for setting, read in (("metrics.token_file", lambda: metrics_token(config.metrics)),
                          ("serving.notify_token_file", lambda: notify_token(config.serving))):
        try:
            read()
        except ValueError as exc:
            return setting, str(exc)
    return None


def start_metrics_server(registry: CollectorRegistry, host: str, port: int, *, tls: TlsFiles | None = None,
                         token: str | None = None) -> tuple[MetricsHttpServer, threading.Thread]:
    """Serve ``registry`` on ``host:port`` from a background thread; (server, thread), as prometheus-client's
    ``start_http_server`` returns: ``server.shutdown()`` stops it."""
    ctx = server_ssl_context(tls) if tls is not None and tls.enabled else None
    app = make_wsgi_app(registry)
    if token is not None:
        app = _with_token(app, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsHttpServer", (MetricsHttpServer,), {"address_family": family})
    server = server_class((host, port), ctx)
    server.set_app(app)
    thread = threading.Thread(target=server.serve_forever, name="unlearnd-metrics", daemon=True)
    thread.start()
    return server, thread
