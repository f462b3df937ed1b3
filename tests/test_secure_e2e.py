"""Issue 23's first bar, as one deployment: TLS on every connection and a token on every control endpoint.

The broker is Tansu behind Debian's stunnel (clients reach it only over TLS); the daemon consumes, publishes its
receipts and creates its topics over TLS, serves its own ``/metrics`` over HTTPS with a bearer token, and tells
an ``unlearnd serve`` on HTTPS + token to reload (the server's registry poll is switched off, so only that
authenticated notification can move it). A forget request published with ``unlearnd publish`` over TLS travels,
its receipt comes back over TLS, the server answers with the new version; without the token the load endpoint
and ``/metrics`` answer 401, and a client without the CA refuses both HTTPS endpoints."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.data.mnist import load_mnist
from tests.pipeline_harness import (ROOT, DaemonProcess, Pki, TlsBroker, copy_registry, free_port, stunnel_binary,
                                    write_config)
from tests.test_serve import Server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(stunnel_binary() is None, reason="needs stunnel4 (make test-deps)")]

MODEL = "mnist-cnn"
TOKEN = "e2e-token-0123456789abcdef0123456789"


def _https(port: int, ctx: ssl.SSLContext, method: str, path: str, body: bytes | None = None,
           token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class _HttpsServer(Server):
    """``unlearnd serve`` on HTTPS with the test CA's certificate; its probe trusts that CA."""

    def __init__(self, reg: Path, pki: Pki, *extra: str) -> None:
        self.ctx = ssl.create_default_context(cafile=str(pki.ca))
        super().__init__(reg, MODEL, "--tls-cert-file", str(pki.cert), "--tls-key-file", str(pki.key), *extra)

    def probe(self) -> int:
        return _https(self.port, self.ctx, "GET", "/v2/health/live")[0]


def _served_version(server: _HttpsServer) -> int:
    x = np.zeros((1, 1, 28, 28), np.float32)
    body = json.dumps({"inputs": [{"name": "INPUT__0", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
    status, _, raw = _https(server.port, server.ctx, "POST", f"/v2/models/{MODEL}/infer", body, TOKEN)
    assert status == 200, raw
    return int(json.loads(raw)["model_version"])


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_tls_everywhere_and_a_token_on_every_control_endpoint(tmp_path: Path, mnist_registry: Path) -> None:
    pki = Pki(tmp_path / "pki").make()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o400)
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    broker = TlsBroker(pki).start()
    server = _HttpsServer(reg, pki, "--token-file", str(token_file), "--auth-inference", "--poll-interval", "600")
    metrics_port = free_port()
    cfg = write_config(
        tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=tmp_path / "state",
        metrics_port=metrics_port,
        kafka_extra=f'security_protocol = "SSL"\nssl_cafile = "{pki.ca}"\nrequest_timeout_ms = 5000',
        metrics_extra=f'token_file = "{token_file}"\ntls_cert_file = "{pki.cert}"\ntls_key_file = "{pki.key}"',
        extra=(f'[serving]\nnotify_urls = ["https://127.0.0.1:{server.port}/v2/repository/models/{{name}}/load"]\n'
               f'notify_token_file = "{token_file}"\nnotify_ca_file = "{pki.ca}"'))
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        d.wait_assigned(timeout=90)
        assert _served_version(server) == 1
        label = int(load_mnist().train_y[0])
        out = _cli("publish", "--config", str(cfg), "--model", MODEL, "--ref", "mnist-train:0", "--label", str(label),
                   "--request-id", "secure-e2e")
        assert out.returncode == 0, out.stderr
        out = _cli("receipts", "--bootstrap", broker.bootstrap, "--security-protocol", "SSL", "--ssl-cafile",
                   str(pki.ca), "--from-beginning", "--json", "--request-id", "secure-e2e", "--count", "1",
                   "--timeout", "240", timeout=300)      # the flags, where publish above took --config
        assert out.returncode == 0, (out.stderr, d.tail())
        receipt = json.loads(out.stdout.splitlines()[0])
        assert receipt["status"] == "applied" and receipt["model_version"] == 2, (receipt, d.tail())

        # the server moved to version 2 only through the daemon's authenticated HTTPS notification
        deadline = time.monotonic() + 30
        while _served_version(server) != 2:
            assert time.monotonic() < deadline, d.tail()
            time.sleep(0.2)

        # control endpoints: 401 without the token, a client without the CA refuses the server
        load = f"/v2/repository/models/{MODEL}/load"
        assert _https(server.port, server.ctx, "POST", load, b"{}")[0] == 401
        assert _https(server.port, server.ctx, "POST", load, b"{}", TOKEN)[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            _https(server.port, ssl.create_default_context(), "GET", "/v2/health/live")

        # the daemon's /metrics: HTTPS + token, the round counted; 401 without the token; unknown CA refused
        status, _, text = _https(metrics_port, server.ctx, "GET", "/metrics", token=TOKEN)
        rounds = [line for line in text.decode().splitlines() if line.startswith("unlearnd_rounds_total")]
        assert status == 200 and 'unlearnd_rounds_total{outcome="applied"} 1.0' in rounds, rounds
        assert _https(metrics_port, server.ctx, "GET", "/metrics")[0] == 401
        with pytest.raises(ssl.SSLCertVerificationError):
            _https(metrics_port, ssl.create_default_context(), "GET", "/metrics", token=TOKEN)

        # every Kafka connection went through the TLS terminator, and the token was never logged
        assert broker.tunnel.log.read_text().count("accepted connection") >= 5
        assert TOKEN not in d.log.read_text()
    finally:
        d.kill()
        rc, server_out = server.stop()
        broker.stop()
    assert rc == 0 and TOKEN not in server_out, server_out
