"""deploy/nginx: the template renders with the server's own limits, `nginx -t` accepts it, and a live nginx from
it ends oversized claims itself, keeps its upstream connections alive and limits each client address apart.

Needs: the `nginx` binary (Debian's nginx-light; `make test-deps` installs it) for the last two tests, which are
skipped without it. The upstream in the live test is a small real HTTP server recording what reaches it."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from daemon.cli import build_parser
from tests.pipeline_harness import free_port, stop_process
from tests.test_deploy_promql import DEPLOY

_spec = importlib.util.spec_from_file_location("nginx_render", DEPLOY / "nginx" / "render.py")
assert _spec is not None and _spec.loader is not None
render_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_mod)

NGINX = shutil.which("nginx")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="needs the nginx binary (Debian nginx-light; make test-deps)")


def test_template_placeholders_all_have_defaults_or_are_required() -> None:
    used = render_mod.placeholders(render_mod.TEMPLATE.read_text())
    assert used == set(render_mod.DEFAULTS), "template placeholders and render.DEFAULTS disagree"


def test_defaults_equal_the_server_limits() -> None:
    """A request nginx lets through is never one `unlearnd serve` (at its defaults) would refuse, and the reverse."""
    args = build_parser().parse_args(["serve", "--model", "m"])
    d = render_mod.DEFAULTS
    assert float(d["HEADER_TIMEOUT_S"]) == args.header_timeout
    assert float(d["BODY_TIMEOUT_S"]) == args.body_timeout
    assert int(d["MAX_BODY_BYTES"]) == args.max_body_bytes
    assert int(d["MAX_HEADER_BYTES"]) == args.max_header_bytes


def test_render_refuses_missing_unknown_and_injected_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no value for \['PREFIX'\]"):
        render_mod.render({})
    with pytest.raises(ValueError, match=r"no placeholder for \['HEADER_TIMEOUT'\]"):
        render_mod.render({"PREFIX": str(tmp_path), "HEADER_TIMEOUT": "5"})
    with pytest.raises(ValueError, match=r"\['LISTEN'\] contain"):
        render_mod.render({"PREFIX": str(tmp_path), "LISTEN": "8080; include /etc/passwd"})
    text = render_mod.render({"PREFIX": str(tmp_path)})
    assert "${" not in text and "$binary_remote_addr" in text and "$proxy_add_x_forwarded_for" in text


def _write_conf(prefix: Path, **values: str) -> Path:
    conf = prefix / "nginx.conf"
    conf.write_text(render_mod.render({"PREFIX": str(prefix), **values}))
    return conf


@needs_nginx
def test_nginx_accepts_the_rendered_template(tmp_path: Path) -> None:
    conf = _write_conf(tmp_path, LISTEN=f"127.0.0.1:{free_port()}")
    done = subprocess.run([NGINX, "-t", "-q", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


class _Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:   # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.seen.append({"peer_port": self.client_address[1], "body": body,
                                    "xff": self.headers.get("X-Forwarded-For")})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        server = self
        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture()
def proxied(tmp_path: Path) -> Iterator[tuple[int, _Upstream]]:
    with _live_nginx(tmp_path) as live:
        yield live


@contextlib.contextmanager
def _live_nginx(tmp_path: Path, **values: str) -> Iterator[tuple[int, _Upstream]]:
    """A live nginx from the template (rate 1/s, burst 1 per address) in front of a recording upstream."""
    upstream = _Upstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    conf = _write_conf(tmp_path, **{"LISTEN": f"127.0.0.1:{port}", "UPSTREAM": f"127.0.0.1:{upstream.server_address[1]}",
                                    "WORKER_PROCESSES": "1", "REQ_PER_S": "1", "REQ_BURST": "1",
                                    "WORKER_RLIMIT_NOFILE": "4096", "WORKER_CONNECTIONS": "1024", **values})
    tmp_path.chmod(0o755)   # a root master runs its worker as nobody, which must reach the temp paths
    proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "error.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)
        yield port, upstream
    finally:
        stop_process(proc)
        upstream.shutdown()
        upstream.server_close()


def _post(port: int, source: str, body: bytes = b'{"x": 1}') -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("POST", "/v2/models/m/infer", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@needs_nginx
def test_live_proxy_ends_oversized_claims_and_limits_each_address_apart(proxied: tuple[int, _Upstream]) -> None:
    port, upstream = proxied
    # a 1 GiB claim is answered by nginx alone, before any body, and never reaches the server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n{")
        assert s.recv(64).startswith(b"HTTP/1.1 413")
    assert upstream.seen == []
    # one address over its rate (1/s, burst 1) is answered 429; another address is not held back by it
    assert [_post(port, "127.0.0.3") for _ in range(3)] == [200, 200, 429]
    assert _post(port, "127.0.0.2", b'{"x": 2}') == 200
    assert [r["body"] for r in upstream.seen] == [b'{"x": 1}', b'{"x": 1}', b'{"x": 2}']
    assert [r["xff"] for r in upstream.seen] == ["127.0.0.3", "127.0.0.3", "127.0.0.2"]
    # three requests on three client connections reached the server over one kept-alive upstream connection
    assert len({r["peer_port"] for r in upstream.seen}) == 1


@needs_nginx
def test_an_empty_client_key_switches_the_per_address_limits_off(tmp_path: Path) -> None:
    """CLIENT_KEY='""' (for a front where the addresses are not the clients'): one address past the rate is still
    served, and the other limits (here the body size) still hold."""
    with _live_nginx(tmp_path, CLIENT_KEY='""', MAX_BODY_BYTES="1024") as (port, upstream):
        assert [_post(port, "127.0.0.3") for _ in range(4)] == [200, 200, 200, 200]
        assert _post(port, "127.0.0.3", b"x" * 2048) == 413
        assert len(upstream.seen) == 4
