"""The daemon's ``/metrics`` over TLS (and mutual TLS) behind a bearer token (issue 23), from its config section.

A real ``DaemonMetrics`` HTTP server on 127.0.0.1, scraped with ``urllib`` and parsed as Prometheus text, and the
config checks that refuse unusable TLS or token files at load (``unlearnd config check``) with the key named.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.pipeline.config import ConfigError, load_config
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.metrics_http import metrics_tls, metrics_token
from tests.test_serve_security import TOKEN, make_pki, pki, token_file  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="needs openssl")


def _config(tmp_path: Path, **metrics: object) -> Path:
    lines = ["[metrics]", 'host = "127.0.0.1"', "port = 1"]
    lines += [f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {str(v).lower()}"
              for k, v in metrics.items()]
    lines += ["[[models]]", 'name = "mnist-cnn"']
    path = tmp_path / "unlearnd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _scrape(url: str, ctx: ssl.SSLContext | None, token: str | None = None) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:   # noqa: S310 - a local test server
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_daemon_metrics_over_mutual_tls_with_a_token(tmp_path: Path, pki: dict[str, Path],  # noqa: F811
                                                     token_file: Path) -> None:  # noqa: F811
    config = load_config(_config(tmp_path, token_file=str(token_file), tls_cert_file=str(pki["server.pem"]),
                                 tls_key_file=str(pki["server.key"]), tls_client_ca_file=str(pki["ca.pem"])),
                         env={})
    m = config.metrics
    metrics = DaemonMetrics()
    metrics.pending.set(3)
    server, _ = metrics.serve("127.0.0.1", 0, tls=metrics_tls(m), token=metrics_token(m))
    url = f"https://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _scrape(url, ssl.create_default_context())                         # does not know the CA
        ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with pytest.raises((urllib.error.URLError, ConnectionResetError, ssl.SSLError)):
            _scrape(url, ctx, TOKEN)                                             # no client certificate
        ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        status, body, headers = _scrape(url, ctx)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in body
        assert _scrape(url, ctx, "not-the-token-0123456789")[0] == 401
        status, body, _ = _scrape(url, ctx, TOKEN)
        assert status == 200
        samples = {s.name: s.value for fam in text_string_to_metric_families(body) for s in fam.samples}
        assert samples["unlearnd_pending_requests"] == 3
    finally:
        server.shutdown()


def test_a_stalled_connection_does_not_block_scrapes(pki: dict[str, Path]) -> None:  # noqa: F811
    import socket

    from daemon.endpoint_auth import TlsFiles

    metrics = DaemonMetrics()
    server, _ = metrics.serve("127.0.0.1", 0, tls=TlsFiles(pki["server.pem"], pki["server.key"]))
    port = server.server_address[1]
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]   # never handshake
    try:
        ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        assert _scrape(f"https://127.0.0.1:{port}/metrics", ctx)[0] == 200
    finally:
        for s in stalled:
            s.close()
        server.shutdown()


@pytest.mark.parametrize(("settings", "key", "message"), [
    ({"tls_cert_file": "/nonexistent.pem"}, "metrics.tls_key_file", "both a certificate file and a key file"),
    ({"tls_cert_file": "/nonexistent.pem", "tls_key_file": "/nonexistent.key"}, "metrics.tls_cert_file",
     "cannot load"),
    ({"token_file": "/nonexistent-token"}, "metrics.token_file", "cannot read"),
])
def test_unusable_security_files_are_refused_at_load(tmp_path: Path, settings: dict[str, str], key: str,
                                                    message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_config(tmp_path, **settings), env={})
    assert info.value.setting == key


def test_a_short_token_is_refused_and_never_echoed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("hunter2\n")
    with pytest.raises(ConfigError, match="at least 16") as info:
        load_config(_config(tmp_path, token_file=str(path)), env={})
    assert "hunter2" not in str(info.value)
    # the environment overrides the file's setting, as every other key
    with pytest.raises(ConfigError, match="token file .*at least 16"):
        load_config(_config(tmp_path), env={"UNLEARND_METRICS_TOKEN_FILE": str(path)})
