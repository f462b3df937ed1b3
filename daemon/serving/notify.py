"""Notify servers of a new version instead of waiting for their poll.

After a version is durable and ``LATEST`` names it, the publisher POSTs to each configured reload URL
(``POST /v2/repository/models/{name}/load``: unlearnd's and Triton's explicit-mode endpoint). The calls run
concurrently, each bounded by ``timeout``, and never raise: a server that is down still finds the version
by polling, so a failed notification is reported, not fatal.

A server that wants a token for its load endpoint (``unlearnd serve --token-file``) is sent it as
``Authorization: Bearer``; an ``https://`` server's certificate is checked against ``cafile`` (else the system's
CAs), with a client certificate for mutual TLS when ``client_cert`` is given.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["NotifyResult", "client_ssl_context", "notify_reload", "reload_url"]

_MAX_DETAIL = 300


@dataclass(frozen=True)
class NotifyResult:
    """The outcome of one reload call: ``ok`` when the server answered 200."""

    url: str
    ok: bool
    status: int | None
    detail: str
    seconds: float


def reload_url(base_url: str, model: str) -> str:
    """``http://host:port`` + model -> that server's reload endpoint for the model."""
    return f"{base_url.rstrip('/')}/v2/repository/models/{quote(model, safe='')}/load"


def client_ssl_context(cafile: str | None = None, client_cert: str | None = None,
                       client_key: str | None = None) -> ssl.SSLContext:
    """A client context verifying the server against ``cafile`` (the system's CAs without it)."""
    ctx = ssl.create_default_context(cafile=cafile or None)
    if client_cert:
        ctx.load_cert_chain(client_cert, client_key or None)
    return ctx


def _call(url: str, timeout: float, token: str | None, ctx: ssl.SSLContext | None) -> NotifyResult:
    start = time.perf_counter()
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url, data=b"{}", method="POST", headers=headers)
        with urllib.request.urlopen(request, timeout=timeout,  # noqa: S310 - operator-configured URL
                                    context=ctx if url.startswith("https:") else None) as response:
            body = response.read(_MAX_DETAIL).decode("utf-8", "replace")
            return NotifyResult(url, response.status == 200, response.status, body, time.perf_counter() - start)
    except urllib.error.HTTPError as exc:
        body = exc.read(_MAX_DETAIL).decode("utf-8", "replace")
        try:
            body = str(json.loads(body).get("error", body))
        except (ValueError, AttributeError):
            pass
        return NotifyResult(url, False, exc.code, body, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - by contract a notification never raises
        return NotifyResult(url, False, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)


def notify_reload(urls: Sequence[str], *, timeout: float = 2.0, model: str | None = None, token: str | None = None,
                  ssl_context: ssl.SSLContext | None = None) -> list[NotifyResult]:
    """POST to every URL concurrently; one result per URL, in order. Never raises.

    With ``model``, a ``{name}`` in a URL is replaced by the (URL-quoted) model name, so one configured
    template (``http://host:8000/v2/repository/models/{name}/load``) serves every model.
    """
    if not urls:
        return []
    if model is not None:
        urls = [u.replace("{name}", quote(model, safe="")) for u in urls]
    if len(urls) == 1:
        return [_call(urls[0], timeout, token, ssl_context)]
    with ThreadPoolExecutor(max_workers=min(16, len(urls)), thread_name_prefix="unlearnd-notify") as pool:
        return list(pool.map(lambda u: _call(u, timeout, token, ssl_context), urls))
