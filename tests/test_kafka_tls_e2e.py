"""The daemon against a broker behind TLS (Tansu behind Debian's stunnel) when something is wrong: the wrong CA, a
contradictory setting, a refused SASL login. A request travelling over TLS end to end (publish, daemon, receipts)
is tests/test_secure_e2e.py, with the server and /metrics on TLS and a token too."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.pipeline_harness import ROOT, DaemonProcess, Pki, TlsBroker, copy_registry, stunnel_binary, write_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(stunnel_binary() is None, reason="needs stunnel4 (make test-deps)")]


@pytest.mark.parametrize("create_topics", ["true", "false"])
def test_the_daemon_refuses_a_broker_whose_certificate_fails_and_says_why(tmp_path, mnist_registry, create_topics):
    """Wrong CA: `unlearnd run` logs the certificate error (not a bare timeout) and exits 1 after startup_wait_s,
    also when it creates no topics (the certificate check comes first either way)."""
    pki = Pki(tmp_path / "pki").make()
    broker = TlsBroker(pki).start()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=tmp_path / "state",
                       kafka_extra=f'security_protocol = "SSL"\nssl_cafile = "{pki.other_ca}"\nstartup_wait_s = 3\n'
                                   f'create_topics = {create_topics}')
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
