"""Units of issue 23's serving pieces: the bearer check, the token file, TLS settings and the JSON depth bound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.endpoint_auth import TlsFiles, check_bearer, read_token_file, unauthorized_header
from daemon.serving.guard import ConnectionLimits
from daemon.serving.protocol import MAX_JSON_DEPTH, ProtocolError, check_json_depth, loads_json
from daemon.serving.settings import ServeSettings

TOKEN = "0123456789abcdef0123"


@pytest.mark.parametrize(("header", "ok"), [
    (f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True), (f"Bearer  {TOKEN} ", True),
    (None, False), ("", False), (f"Basic {TOKEN}", False), (f"Bearer {TOKEN}x", False), (f"Bearer {TOKEN[:-1]}", False),
    (TOKEN, False), ("Bearer \u00e9", False),
])
def test_bearer_check(header: str | None, ok: bool) -> None:
    assert check_bearer(header, TOKEN) is ok


def test_www_authenticate_says_invalid_token_only_when_one_was_sent() -> None:
    assert unauthorized_header(None, "r") == 'Bearer realm="r"'
    assert unauthorized_header("Bearer x", "r") == 'Bearer realm="r", error="invalid_token"'


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty"), (b"short\n", "at least 16"), (b"two words here 0123456789", "without spaces"),
    (b"\xff" * 20, "printable ASCII"), (b"a" * 5000, "one token"),
])
def test_token_file_refusals_name_the_file_and_never_the_token(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_token_file(path)
    assert str(path) in str(info.value)
    if content.strip():
        assert content.decode("latin-1").strip()[:12] not in str(info.value)


def test_token_file_is_read_stripped(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(f"  {TOKEN}\n")
    assert read_token_file(tmp_path / "t") == TOKEN
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_settings_never_show_the_token_and_check_what_depends_on_it(tmp_path: Path) -> None:
    settings = ServeSettings(registry=tmp_path, model="m", token=TOKEN)
    assert TOKEN not in repr(settings)
    with pytest.raises(ValueError, match="needs the token"):
        ServeSettings(registry=tmp_path, model="m", auth_inference=True)
    with pytest.raises(ValueError, match="header_timeout_s"):
        ServeSettings(registry=tmp_path, model="m", header_timeout_s=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"certfile": "c.pem"}, "both a certificate file and a key file"),
    ({"client_cafile": "ca.pem"}, "needs TLS"),
    ({"certfile": "c", "keyfile": "k", "client_auth_required": True}, "client CA file"),
])
def test_tls_files_that_do_not_fit_together_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TlsFiles(**kwargs)


def test_connection_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionLimits(max_body_bytes=1, max_connections=0)
    with pytest.raises(ValueError, match="body_timeout_s"):
        ConnectionLimits(max_body_bytes=1, body_timeout_s=0)


def _depth_error(text: bytes) -> str | None:
    try:
        check_json_depth(text)
    except ProtocolError as exc:
        assert exc.status == 400
        return exc.message
    return None


def test_depth_bound_counts_structure_not_strings() -> None:
    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert f"nested {MAX_JSON_DEPTH + 1} levels" in _depth_error(deep)
    assert _depth_error(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is None
    # brackets inside strings are not structure, whatever their escapes
    assert _depth_error(json.dumps({"id": "[" * 500, "x": [[1]]}).encode()) is None
    assert _depth_error(json.dumps({"id": '\\"[' * 100 + "\\", "x": [[1]]}).encode()) is None
    # ... and closing brackets inside strings do not hide real depth
    hidden = json.dumps({"id": "]" * 500}).encode()[:-1] + b', "x": ' + deep + b"}"
    assert _depth_error(hidden) is not None
    tricky = b'{"id": "\\\\", "x": ' + deep + b"}"       # an escaped backslash closes the string
    assert _depth_error(tricky) is not None


def test_loads_json_answers_400_for_deep_or_broken_json() -> None:
    for text in (b"[" * 100_000, b"{" * 2000, b'{"a": ', b"\xff"):
        with pytest.raises(ProtocolError) as info:
            loads_json(text)
        assert info.value.status == 400
    assert loads_json(b'{"a": [[1]]}') == {"a": [[1]]}


def test_an_unexpected_exception_is_answered_500_and_counted() -> None:
    """``_CountErrors`` around a Starlette app whose endpoint raises: the 500 is counted once, under the served
    version, and a 4xx answered by Starlette itself (unknown route) is counted too."""
    import asyncio

    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from daemon.serving.app import _CountErrors
    from daemon.serving.metrics import ServeMetrics

    class Holder:
        current = None

    async def boom(request: object) -> None:
        raise RuntimeError("boom")

    async def on_error(request: object, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "internal error"}, status_code=500)

    metrics = ServeMetrics(CollectorRegistry())
    app = Starlette(routes=[Route("/boom", boom)], exception_handlers={Exception: on_error},
                    middleware=[Middleware(_CountErrors, metrics=metrics, holder=Holder())])

    async def call(path: str) -> int:
        sent: list[dict] = []
        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [], "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
                 "root_path": ""}

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        try:
            await app(scope, receive, send)
        except RuntimeError:
            pass                         # Starlette re-raises after answering, for the server to log
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    assert asyncio.run(call("/boom")) == 500
    assert asyncio.run(call("/nowhere")) == 404
    reg = metrics.registry
    assert reg.get_sample_value("unlearnd_serve_requests_total", {"version": "none", "code": "500"}) == 1
    assert reg.get_sample_value("unlearnd_serve_requests_total", {"version": "none", "code": "404"}) == 1


def test_the_token_file_path_may_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``UNLEARND_SERVE_TOKEN_FILE`` overrides ``--token-file`` (as the daemon's env overrides do); a bad file is a
    usage error naming it."""
    import argparse

    from daemon.errors import UsageError
    from daemon.serving.cli import TOKEN_FILE_ENV, _security

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text(TOKEN)
    bad.write_text("short")
    args = argparse.Namespace(token_file=str(bad), tls_cert_file=None, tls_key_file=None, tls_client_ca_file=None,
                              tls_client_auth_required=False)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(good))
    assert _security(args)[0] == TOKEN
    monkeypatch.delenv(TOKEN_FILE_ENV)
    with pytest.raises(UsageError, match=str(bad)):
        _security(args)
