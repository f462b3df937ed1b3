"""Notify servers of a new version instead of waiting for their poll.

After a version is durable and ``LATEST`` names it, the publisher POSTs to each configured reload URL
(``POST /v2/repository/models/{name}/load``: unlearnd's and Triton's explicit-mode endpoint). The calls run
concurrently, each bounded by ``timeout``, and never raise: a server that is down still finds the version
by polling, so a failed notification is reported, not fatal.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

__all__ = ["NotifyResult", "notify_reload", "reload_url"]

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


def _call(url: str, timeout: float) -> NotifyResult:
    start = time.perf_counter()
    try:
        request = urllib.request.Request(url, data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - operator-configured URL
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


def notify_reload(urls: Sequence[str], *, timeout: float = 2.0, model: str | None = None) -> list[NotifyResult]:
    """POST to every URL concurrently; one result per URL, in order. Never raises.

    With ``model``, a ``{name}`` in a URL is replaced by the (URL-quoted) model name, so one configured
    template (``http://host:8000/v2/repository/models/{name}/load``) serves every model.
    """
    if not urls:
        return []
    if model is not None:
        urls = [u.replace("{name}", quote(model, safe="")) for u in urls]
    if len(urls) == 1:
        return [_call(urls[0], timeout)]
    with ThreadPoolExecutor(max_workers=min(16, len(urls)), thread_name_prefix="unlearnd-notify") as pool:
        return list(pool.map(lambda u: _call(u, timeout), urls))
