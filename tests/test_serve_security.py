"""`unlearnd serve` hardened (issue 23): TLS and mutual TLS, the bearer token, and limits no client can exhaust.

Real server processes on 127.0.0.1 (``tests/test_serve.py``'s ``Server``), real sockets, a CA and certificates
made here with ``openssl``.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from daemon.serving.notify import notify_reload
from tests.test_serve import NAME, SHAPE, Server, publish, request, scrape

TOKEN = "t0ken-for-the-tests-0123456789abcdef"
MAX_BODY = 100_000
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def make_pki(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=unlearnd test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=unlearnd {name}")
        (root / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {n: root / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-sec-registry")
    publish(root)
    return root


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o400)
    return path


@pytest.fixture(scope="module")
def server(reg: Path, token_file: Path) -> Iterator[Server]:
    """Plain HTTP with a token (inference open), small limits so the tests are quick."""
    srv = Server(reg, NAME, "--token-file", str(token_file), "--max-body-bytes", str(MAX_BODY),
                 "--header-timeout", "1.5", "--body-timeout", "1.5", "--max-connections", "64")
    yield srv
    rc, out = srv.stop()
    assert rc == 0, out
    assert TOKEN not in out                      # the token is never logged


def _infer_body(data: object = None) -> bytes:
    tensor = {"name": "INPUT__0", "shape": [1, *SHAPE], "datatype": "FP32",
              "data": [0.5] * 784 if data is None else data}
    return json.dumps({"inputs": [tensor]}).encode()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


# -- the token --------------------------------------------------------------------------------------------
def test_load_needs_the_token_401_without_200_with(server: Server) -> None:
    path = f"/v2/repository/models/{NAME}/load"
    status, headers, body = request(server, "POST", path, b"{}")
    assert status == 401, body
    assert headers["www-authenticate"].startswith('Bearer realm="unlearnd"')
    assert "Authorization: Bearer" in json.loads(body)["error"]
    status, headers, body = request(server, "POST", path, b"{}", {"Authorization": "Bearer wrong-token-0123456789"})
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    assert "wrong bearer token" in json.loads(body)["error"]
    status, _, body = request(server, "POST", path, b"{}", _auth())
    assert status == 200, body


def test_index_and_metrics_need_the_token_health_and_inference_do_not(server: Server) -> None:
    assert request(server, "POST", "/v2/repository/index")[0] == 401
    assert request(server, "GET", "/metrics")[0] == 401
    assert request(server, "POST", "/v2/repository/index", b"", _auth())[0] == 200
    assert request(server, "GET", "/metrics", None, _auth())[0] == 200
    assert request(server, "GET", "/v2/health/live")[0] == 200
    assert request(server, "GET", "/v2/health/ready")[0] == 200
    assert request(server, "POST", f"/v2/models/{NAME}/infer", _infer_body())[0] == 200   # not asked for


# -- limits -----------------------------------------------------------------------------------------------
def _raw(server: Server, payload: bytes, *, wait: float = 10.0) -> tuple[bytes, float]:
    """Send ``payload`` on a fresh connection, read until the server closes; (answer, seconds)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - start


def test_a_1_gib_claim_is_answered_413_at_once_and_closed(server: Server) -> None:
    head = (f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1 << 30}\r\n\r\n").encode()
    answer, seconds = _raw(server, head + b"{")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert seconds < 2.0                                  # answered and closed, not waiting for 1 GiB
    assert b"exceeds the limit of 100000 bytes" in answer and b"x-model-version:" in answer.lower()


def test_a_slow_body_is_answered_408_within_the_timeout(server: Server) -> None:
    head = (f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").encode()
    answer, seconds = _raw(server, head + b"{")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body did not arrive within 1.5 s" in answer
    assert 1.2 < seconds < 5.0


def test_slow_headers_are_answered_408_and_closed(server: Server) -> None:
    answer, seconds = _raw(server, b"POST /v2/models/x/infer HTTP/1.1\r\nHost: x\r\nX-a: ")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 1.2 < seconds < 5.0
    answer, seconds = _raw(server, b"")                    # a connection that never says anything
    assert answer.startswith(b"HTTP/1.1 408") and seconds < 5.0


def test_endless_headers_are_answered_431(server: Server) -> None:
    answer, _ = _raw(server, b"GET /v2 HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


@pytest.mark.parametrize("path", [f"/v2/models/{NAME}/infer", f"/v2/repository/models/{NAME}/load"])
def test_deeply_nested_json_is_400_with_a_reason_not_500(server: Server, path: str) -> None:
    deep = b"[" * 990 + b"0.5" + b"]" * 990
    body = b'{"inputs": [{"name": "INPUT__0", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ' + deep + b"}]}"
    if "load" in path:
        body = b'{"parameters": ' + deep + b"}"
    status, _, raw = request(server, "POST", path, body, _auth())
    assert status == 400, raw
    assert "nested" in json.loads(raw)["error"] and "at most 32" in json.loads(raw)["error"]


def test_the_cap_closes_stalled_connections_not_a_new_client(server: Server) -> None:
    """64 connections held open by a client that sends nothing, then more: the server stays under its cap by
    closing the stalled ones, oldest first, and a legitimate request still gets its 200."""
    stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(80)]
    try:
        time.sleep(0.3)
        for _ in range(5):
            status, _, raw = request(server, "POST", f"/v2/models/{NAME}/infer", _infer_body())
            assert status == 200, raw
        closed = 0
        for s in stalled[:16]:                            # the oldest were closed for the newer ones
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed >= 10
    finally:
        for s in stalled:
            s.close()
    metrics = scrape_auth(server)
    assert metrics[("unlearnd_serve_connections_dropped_total", (("reason", "evicted"),))] >= 16


def scrape_auth(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = request(server, "GET", "/metrics", None, _auth())
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}


def test_every_4xx_is_counted_in_the_request_metrics(server: Server) -> None:
    def codes() -> dict[str, float]:
        out: dict[str, float] = {}
        for (name, labels), value in scrape_auth(server).items():
            if name == "unlearnd_serve_requests_total":
                code = dict(labels)["code"]
                out[code] = out.get(code, 0) + value
        return out

    before = codes()
    request(server, "POST", "/v2/repository/index")                         # 401
    request(server, "GET", "/no/such/endpoint")                              # 404
    request(server, "POST", f"/v2/repository/models/{NAME}/load", b"[" * 100, _auth())   # 400 (depth)
    _raw(server, f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nContent-Length: {1 << 30}\r\n\r\n".encode())  # 413
    _raw(server, b"GET /v2 HTTP/1.1\r\n")                                  # 408 (slow headers)
    after = codes()
    for code in ("401", "404", "400", "413", "408"):
        assert after.get(code, 0) >= before.get(code, 0) + 1, (code, before, after)


# -- TLS --------------------------------------------------------------------------------------------------
def _tls_request(port: int, ctx: ssl.SSLContext, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_tls_with_mutual_auth_and_token(reg: Path, pki: dict[str, Path], token_file: Path) -> None:
    srv = _TlsServer(reg, "--token-file", str(token_file), "--auth-inference",
                     "--tls-cert-file", str(pki["server.pem"]), "--tls-key-file", str(pki["server.key"]),
                     "--tls-client-ca-file", str(pki["ca.pem"]), "--tls-client-auth-required", pki=pki)
    try:
        # a client that does not know the CA refuses the server
        with pytest.raises(ssl.SSLCertVerificationError):
            _tls_request(srv.port, ssl.create_default_context(), "GET", "/v2/health/live")
        # knowing the CA but without a client certificate: the server refuses the client
        anonymous = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with pytest.raises((ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
            _tls_request(srv.port, anonymous, "GET", "/v2/health/live")
        ctx = srv.client_context()
        assert _tls_request(srv.port, ctx, "POST", f"/v2/models/{NAME}/infer", _infer_body())[0] == 401
        status, body = _tls_request(srv.port, ctx, "POST", f"/v2/models/{NAME}/infer", _infer_body(), _auth())
        assert status == 200, body
        assert np.asarray(json.loads(body)["outputs"][0]["data"]).shape == (10,)
        assert _tls_request(srv.port, ctx, "POST", f"/v2/repository/models/{NAME}/load", b"{}")[0] == 401
        # the publisher's notification carries the token and checks the server against the CA
        url = f"https://127.0.0.1:{srv.port}/v2/repository/models/{NAME}/load"
        [denied] = notify_reload([url], ssl_context=ctx)
        assert denied.status == 401 and "Authorization: Bearer" in denied.detail
        [done] = notify_reload([url], token=TOKEN, ssl_context=ctx)
        assert done.ok, done
    finally:
        rc, out = srv.stop()
    assert rc == 0, out


class _TlsServer(Server):
    """``Server`` whose readiness probe speaks TLS with the test CA and client certificate."""

    def __init__(self, reg: Path, *extra: str, pki: dict[str, Path]) -> None:
        self.pki = pki
        super().__init__(reg, NAME, *extra)

    def probe(self) -> int:
        return _tls_request(self.port, self.client_context(), "GET", "/v2/health/live")[0]

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki["ca.pem"]))
        ctx.load_cert_chain(str(self.pki["client.pem"]), str(self.pki["client.key"]))
        return ctx


def test_a_refused_reload_500_is_counted(server: Server, reg: Path) -> None:
    from daemon import registry
    from tests.test_serve import corrupt

    def count_500() -> float:
        return sum(v for (name, labels), v in scrape_auth(server).items()
                   if name == "unlearnd_serve_requests_total" and dict(labels)["code"] == "500")

    before = count_500()
    good = registry.latest_version(reg, NAME)
    bad = publish(reg, set_latest=False)
    corrupt(bad.path / registry.STATE_DICT_FILE)
    registry.atomic_write_bytes(reg / NAME / registry.LATEST_FILE, f"{bad.version}\n".encode())
    try:
        status, _, body = request(server, "POST", f"/v2/repository/models/{NAME}/load", b"{}", _auth())
        assert status == 500, body
        assert count_500() == before + 1
    finally:
        fixed = publish(reg)
        assert fixed.version > good
