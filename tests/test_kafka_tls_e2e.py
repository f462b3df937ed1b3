"""A forget request end to end with TLS on every Kafka connection: `unlearnd publish` over TLS, the daemon (consumer,
outbox producer, admin client) over TLS, the receipt read back by `unlearnd receipts` over TLS; the broker is Tansu
behind Debian's stunnel, reachable in clear by no client (it advertises the TLS port)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from daemon.data.mnist import load_mnist
from tests.pipeline_harness import ROOT, DaemonProcess, Pki, TlsBroker, copy_registry, write_config

pytestmark = pytest.mark.slow


def test_a_request_travels_over_tls_and_its_receipt_comes_back_over_tls(tmp_path, mnist_registry):
    pki = Pki(tmp_path / "pki").make()
    broker = TlsBroker(pki).start()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=tmp_path / "state",
                       kafka_extra=f'security_protocol = "SSL"\nssl_cafile = "{pki.ca}"\nrequest_timeout_ms = 5000')
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        d.wait_assigned(timeout=90)
        label = int(load_mnist().train_y[0])
        out = subprocess.run([sys.executable, "-m", "daemon.cli", "publish", "--config", str(cfg), "--model",
                              "mnist-cnn", "--ref", "mnist-train:0", "--label", str(label), "--request-id", "tls-e2e"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        out = subprocess.run([sys.executable, "-m", "daemon.cli", "receipts", "--bootstrap", broker.bootstrap,
                              "--security-protocol", "SSL", "--ssl-cafile", str(pki.ca), "--from-beginning", "--json",
                              "--request-id", "tls-e2e", "--count", "1", "--timeout", "240"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (out.stderr, d.tail())
        receipt = json.loads(out.stdout.splitlines()[0])
        assert receipt["request_id"] == "tls-e2e" and receipt["status"] == "applied", (receipt, d.tail())
        assert receipt["model_version"] == 2
        # every connection went through the TLS terminator: daemon (admin, consumer, outbox), publish, receipts
        accepted = broker.tunnel.log.read_text().count("accepted connection")
        assert accepted >= 5, broker.tunnel.log.read_text()[-2000:]
    finally:
        d.kill()
        broker.stop()


def test_the_daemon_refuses_a_broker_whose_certificate_fails_and_says_why(tmp_path, mnist_registry):
    """Wrong CA: `unlearnd run` logs the certificate error (not a bare timeout) and exits 1 after startup_wait_s."""
    pki = Pki(tmp_path / "pki").make()
    broker = TlsBroker(pki).start()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=tmp_path / "state",
                       kafka_extra=f'security_protocol = "SSL"\nssl_cafile = "{pki.other_ca}"\nstartup_wait_s = 3')
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        assert d.wait(timeout=120) == 1
        unreachable = [e for e in d.events() if e.get("event") == "broker_unreachable"]
        assert unreachable and "kafka.ssl_cafile: the broker" in unreachable[0]["error"], d.tail()
        assert "failed verification" in d.log.read_text()
    finally:
        d.kill()
        broker.stop()


def test_the_daemon_does_not_start_on_a_contradictory_security_setting(tmp_path):
    cfg = write_config(tmp_path / "u.toml", bootstrap="127.0.0.1:9", registry_dir=tmp_path / "r",
                       state_dir=tmp_path / "s",
                       kafka_extra='security_protocol = "SSL"\nssl_cafile = "/nonexistent.pem"')
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "kafka.ssl_cafile: no such file: /nonexistent.pem" in out.stderr


def test_the_daemon_logs_in_with_scram_over_tls_and_never_logs_the_password(tmp_path, mnist_registry):
    """SASL_SSL + SCRAM-SHA-512 with the password from the environment, logging at debug: the daemon's admin client
    runs the SCRAM exchange through stunnel, Tansu refuses the login (it keeps no credentials: docs/operations.md),
    the daemon says so and exits 1; the password appears nowhere in its output."""
    pki = Pki(tmp_path / "pki").make()
    broker = TlsBroker(pki, authentication=True).start()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=tmp_path / "state",
                       kafka_extra=f'security_protocol = "SASL_SSL"\nssl_cafile = "{pki.ca}"\n'
                                   f'sasl_mechanism = "SCRAM-SHA-512"\nsasl_username = "unlearnd"\nstartup_wait_s = 3\n'
                                   f'request_timeout_ms = 3000',
                       extra='[log]\nlevel = "debug"')
    password = "s3cr3t-never-logged"
    d = DaemonProcess(cfg, tmp_path / "daemon.log", env={"UNLEARND_KAFKA_SASL_PASSWORD": password}).start()
    try:
        assert d.wait(timeout=120) == 1
        text = d.log.read_text()
        assert "unlearnd run: cannot reach the broker" in text and "the broker refused the SCRAM login" in text, text
        assert password not in text
    finally:
        d.kill()
        broker.stop()
