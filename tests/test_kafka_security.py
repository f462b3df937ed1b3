"""The [kafka] security settings: checked at `config check` and at start, secrets only from files or the environment
and never shown, and turned into the same kafka-python arguments for every client."""

from __future__ import annotations

import dataclasses
import logging
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.pipeline.config import ConfigError, KafkaSection, load_config
from daemon.pipeline.config_docs import effective_toml, example_toml
from daemon.pipeline.kafka_io import connection_kwargs
from daemon.pipeline.kafka_security import FileTokenProvider, KafkaSecurityError, Secret, client_kwargs
from tests.pipeline_harness import ROOT, Pki

SECRET = "hunter2-do-not-print"
MODEL = '[[models]]\nname = "mnist-cnn"\n'


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki")).make()


def _config(tmp_path: Path, kafka: str, env: dict[str, str] | None = None):
    path = tmp_path / "unlearnd.toml"
    path.write_text(f"[kafka]\n{kafka}\n{MODEL}")
    return load_config(path, env=env or {})


@pytest.mark.parametrize(("kafka", "setting", "match"), [
    ('security_protocol = "TLS"', "kafka.security_protocol", "must be one of PLAINTEXT, SSL, SASL_PLAINTEXT"),
    ('security_protocol = "SASL_SSL"', "kafka.sasl_mechanism", "SASL_SSL needs a mechanism"),
    ('security_protocol = "SSL"\nssl_cafile = "/nonexistent/ca.pem"', "kafka.ssl_cafile", "no such file"),
    ('ssl_cafile = "{ca}"', "kafka.ssl_cafile", "security_protocol is PLAINTEXT: TLS settings need SSL"),
    ('sasl_mechanism = "PLAIN"', "kafka.sasl_mechanism", "SASL needs SASL_PLAINTEXT or SASL_SSL"),
    ('security_protocol = "SASL_SSL"\nsasl_mechanism = "GSSAPI"', "kafka.sasl_mechanism", "must be one of"),
    ('security_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-512"', "kafka.sasl_username", "needs a user"),
    ('security_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "SCRAM-SHA-256"\nsasl_username = "u"',
     "kafka.sasl_password_file", "needs a password"),
    ('security_protocol = "SASL_SSL"\nsasl_mechanism = "OAUTHBEARER"', "kafka.sasl_oauth_token_file", "token"),
    ('security_protocol = "SSL"\nssl_keyfile = "{ca}"', "kafka.ssl_keyfile", "needs its certificate"),
    ('sasl_password = "in-clear"', "kafka.sasl_password", "never read from the file"),
    ('ssl_password = "in-clear"', "kafka.ssl_password", "never read from the file"),
])
def test_a_bad_security_combination_is_a_config_error_naming_the_setting(tmp_path, pki, kafka, setting, match):
    with pytest.raises(ConfigError, match=match) as info:
        _config(tmp_path, kafka.replace("{ca}", str(pki.ca)))
    assert info.value.setting == setting


def test_config_check_refuses_sasl_ssl_without_a_mechanism_with_exit_2(tmp_path):
    path = tmp_path / "u.toml"
    path.write_text('[kafka]\nsecurity_protocol = "SASL_SSL"\n')
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "config", "check", "--config", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "kafka.sasl_mechanism: SASL_SSL needs a mechanism" in out.stderr


def test_the_sasl_password_comes_from_the_environment_or_a_file_and_is_never_shown(tmp_path, pki):
    env = {"UNLEARND_KAFKA_SASL_PASSWORD": SECRET}
    cfg = _config(tmp_path, f'security_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-512"\n'
                            f'sasl_username = "alice"\nssl_cafile = "{pki.ca}"', env)
    assert cfg.kafka.sasl_password == SECRET
    assert SECRET not in repr(cfg) and SECRET not in repr(cfg.kafka)
    shown = effective_toml(cfg)
    assert SECRET not in shown and "# sasl_password = ***" in shown
    kwargs = client_kwargs(cfg.kafka)
    assert kwargs["sasl_plain_password"] == SECRET and SECRET not in repr(kwargs)

    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n")
    cfg = _config(tmp_path, f'security_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "PLAIN"\nsasl_username = "a"\n'
                            f'sasl_password_file = "{pw}"')
    assert client_kwargs(cfg.kafka)["sasl_plain_password"] == SECRET       # the file's line, without its newline


def test_config_show_prints_the_settings_in_force_without_secrets_and_stays_loadable(tmp_path, pki):
    path = tmp_path / "u.toml"
    path.write_text(f'[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-256"\n'
                    f'sasl_username = "alice"\nssl_cafile = "{pki.ca}"\n{MODEL}')
    env = {"PATH": "/usr/bin:/bin", "UNLEARND_KAFKA_SASL_PASSWORD": SECRET, "UNLEARND_KAFKA_BOOTSTRAP": "b:9093"}
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "config", "show", "--config", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr
    assert 'bootstrap = "b:9093"' in out.stdout and "# sasl_password = ***" in out.stdout
    shown = tmp_path / "shown.toml"
    shown.write_text(out.stdout)
    assert load_config(shown, env={"UNLEARND_KAFKA_SASL_PASSWORD": SECRET}).kafka == load_config(path, env=env).kafka


def test_the_example_configuration_has_no_secret_key_and_loads(tmp_path):
    text = example_toml()
    assert "\nssl_password =" not in text and "\nsasl_password =" not in text
    assert "UNLEARND_KAFKA_SASL_PASSWORD" in text
    (tmp_path / "u.toml").write_text(text)
    assert load_config(tmp_path / "u.toml", env={}).kafka.security_protocol == "PLAINTEXT"


def test_kafka_python_debug_logs_do_not_show_the_password(tmp_path, caplog):
    """kafka-python logs its whole configuration at DEBUG when a client starts: the password shows as '***'."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    k = dataclasses.replace(KafkaSection(), bootstrap="127.0.0.1:9", security_protocol="SASL_PLAINTEXT",
                            sasl_mechanism="SCRAM-SHA-512", sasl_username="alice", sasl_password=SECRET)
    with caplog.at_level(logging.DEBUG, logger="kafka"):
        with pytest.raises(KafkaError):
            KafkaAdminClient(**connection_kwargs(k), bootstrap_timeout_ms=300, request_timeout_ms=1000)
    started = [r.getMessage() for r in caplog.records if "configuration" in r.getMessage()]
    assert started and "'sasl_plain_password': '***'" in started[0]
    assert SECRET not in caplog.text


def test_every_client_gets_the_same_tls_context_settings(tmp_path, pki):
    k = dataclasses.replace(KafkaSection(), bootstrap="a:1, b:2", security_protocol="SSL", ssl_cafile=str(pki.ca),
                            ssl_check_hostname=False)
    kwargs = connection_kwargs(k)
    assert kwargs["bootstrap_servers"] == ["a:1", "b:2"]
    assert kwargs["security_protocol"] == "SSL" and kwargs["ssl_check_hostname"] is False
    ctx = kwargs["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "unlearnd test ca"),),)]


def test_a_client_key_with_a_wrong_password_is_a_clear_error(tmp_path, pki):
    key = tmp_path / "client.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.key), "-out", str(key), "-aes256", "-passout", "pass:right"],
                   check=True, capture_output=True)
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    k = dataclasses.replace(KafkaSection(), security_protocol="SSL", ssl_cafile=str(pki.ca),
                            ssl_certfile=str(pki.cert), ssl_keyfile=str(key), ssl_password_file=str(pw))
    wrong = r"cannot load the client certificate .* \(wrong kafka.ssl_password\?\)"
    with pytest.raises(KafkaSecurityError, match=wrong):
        client_kwargs(k)
    pw.write_text("right\n")
    assert isinstance(client_kwargs(k)["ssl_context"], ssl.SSLContext)


def test_the_oauth_token_is_read_again_at_each_connection(tmp_path):
    """A token rotated on disk is the one the next connection sends."""
    token = tmp_path / "token"
    token.write_text("first.jwt.token\n")
    k = dataclasses.replace(KafkaSection(), security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER",
                            sasl_oauth_token_file=str(token))
    provider = client_kwargs(k)["sasl_oauth_token_provider"]
    assert isinstance(provider, FileTokenProvider)
    assert provider.token() == "first.jwt.token"
    token.write_text("second.jwt.token\n")
    assert provider.token() == "second.jwt.token"
    assert "jwt" not in repr(provider) and repr(Secret("x")) == "'***'"
    token.write_text("")
    with pytest.raises(KafkaSecurityError, match="sasl_oauth_token_file: .* is empty"):
        provider.token()


def test_a_refusal_seen_before_a_timed_out_retry_is_the_reason_reported():
    """On a loaded machine a retry may time out after the broker refused the login: the refusal is reported."""
    import logging

    from daemon.pipeline.kafka_io import explained_bootstrap

    log = logging.getLogger("kafka.net.manager")
    with explained_bootstrap() as seen:
        assert seen.telling is None
        log.warning("Bootstrap connection to %s failed: %s", "b:1", KeyError("v"))
        log.warning("Bootstrap connection to %s failed: %s", "b:1", TimeoutError("Request timed out after 0 ms"))
        assert "refused the SCRAM login" in seen.telling
    with explained_bootstrap() as seen:
        log.warning("Bootstrap connection to %s failed: %s", "b:1", TimeoutError("Request timed out after 0 ms"))
        assert seen.telling == "TimeoutError: Request timed out after 0 ms"
