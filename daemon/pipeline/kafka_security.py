"""Kafka transport security: TLS and SASL settings checked, their secrets read, and kafka-python's arguments built.

Every Kafka client unlearnd makes (the daemon's consumer, the outbox producer, the admin client, ``unlearnd publish``
and ``unlearnd receipts``) gets its security from :func:`client_kwargs`, so they cannot disagree.

* Secrets (``ssl_password``, the SASL password, the OAUTHBEARER token) come from files or environment variables,
  never from the TOML file in clear; they are wrapped in :class:`Secret`, whose ``repr`` is ``'***'``, because
  kafka-python logs its whole configuration dict at DEBUG.
* The TLS context is built here (``ssl_context=`` for kafka-python), so a wrong key password or a certificate that
  does not match its key is a clear error at start, and :func:`probe_tls` can check the broker's certificate
  with the very same context before a client would retry a failed handshake in silence until its timeout.
* OAUTHBEARER tokens come from :class:`FileTokenProvider`, which re-reads its file on every connection, so a token
  rotated on disk (by a sidecar, a Kubernetes projected volume) is used from the next connection on.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import Any, Protocol

from kafka.errors import KafkaError
from kafka.net.sasl.oauth import AbstractTokenProvider

__all__ = ["MECHANISMS", "PROTOCOLS", "FileTokenProvider", "KafkaSecurityError", "Secret", "SecuritySettings",
           "build_ssl_context", "check_security", "client_kwargs", "probe_tls"]

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")
_SSL_FILES = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile")


class SecuritySettings(Protocol):
    """The ``[kafka]`` settings this module reads (``daemon.pipeline.config.KafkaSection`` has them)."""

    bootstrap: str
    security_protocol: str
    ssl_cafile: str
    ssl_certfile: str
    ssl_keyfile: str
    ssl_password: str
    ssl_password_file: str
    ssl_check_hostname: bool
    ssl_crlfile: str
    sasl_mechanism: str
    sasl_username: str
    sasl_password: str
    sasl_password_file: str
    sasl_oauth_token_file: str


class KafkaSecurityError(KafkaError):
    """The broker's TLS certificate was refused, or a secret could not be read; ``setting`` names what to fix.

    A :class:`KafkaError`, so the daemon's start-up loop reports it like an unreachable broker (and gives up after
    ``kafka.startup_wait_s``), with this message instead of a bare timeout.
    """

    retriable = False

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class Secret(str):
    """A string that never shows itself in a ``repr`` (kafka-python logs its configuration dict at DEBUG)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class FileTokenProvider(AbstractTokenProvider):
    """OAUTHBEARER tokens read from a file at each call, so a token rotated on disk is used at the next connection."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def token(self) -> str:
        try:
            token = Path(self.path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KafkaSecurityError("kafka.sasl_oauth_token_file", f"cannot read {self.path}: {exc}") from exc
        if not token:
            raise KafkaSecurityError("kafka.sasl_oauth_token_file", f"{self.path} is empty")
        return Secret(token)

    def __repr__(self) -> str:
        return f"FileTokenProvider({self.path!r})"


def _read_secret(setting: str, value: str, path: str) -> Secret | None:
    """The secret given directly (from the environment) or the first line of its file; None when neither is set."""
    if value:
        return Secret(value)
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KafkaSecurityError(f"kafka.{setting}_file", f"cannot read {path}: {exc.strerror or exc}") from exc
    secret = text.strip("\r\n")
    if not secret:
        raise KafkaSecurityError(f"kafka.{setting}_file", f"{path} is empty")
    return Secret(secret)


def check_security(s: SecuritySettings) -> tuple[str, str] | None:
    """The first inconsistency of the security settings as (setting, reason), or None when they hold together.

    A setting that would be silently ignored (a CA file on a PLAINTEXT connection, a mechanism without SASL) is an
    error too: it means the operator believes the connection is protected when it is not.
    """
    proto, mech = s.security_protocol, s.sasl_mechanism
    tls, sasl = proto in ("SSL", "SASL_SSL"), proto.startswith("SASL_")
    if proto not in PROTOCOLS:
        return "kafka.security_protocol", f"must be one of {', '.join(PROTOCOLS)}, got {proto!r}"
    if not tls:
        for key in (*_SSL_FILES, "ssl_password", "ssl_password_file"):
            if getattr(s, key):
                return f"kafka.{key}", (f"is set but kafka.security_protocol is {proto}: TLS settings need SSL "
                                        f"or SASL_SSL")
    if sasl and not mech:
        return "kafka.sasl_mechanism", (f"{proto} needs a mechanism: one of {', '.join(m for m in MECHANISMS if m)}")
    if not sasl:
        for key in ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file", "sasl_oauth_token_file"):
            if getattr(s, key):
                return f"kafka.{key}", (f"is set but kafka.security_protocol is {proto}: SASL needs "
                                        f"SASL_PLAINTEXT or SASL_SSL")
    for key in _SSL_FILES + ("ssl_password_file", "sasl_password_file", "sasl_oauth_token_file"):
        path = getattr(s, key)
        if path and not Path(path).is_file():
            return f"kafka.{key}", f"no such file: {path}"
        if path and not os.access(path, os.R_OK):
            return f"kafka.{key}", f"cannot read {path} (permissions)"
    if s.ssl_keyfile and not s.ssl_certfile:
        return "kafka.ssl_keyfile", "a client key needs its certificate (kafka.ssl_certfile)"
    if (s.ssl_password or s.ssl_password_file) and not s.ssl_certfile:
        return "kafka.ssl_password", "a key password needs a client key (kafka.ssl_certfile / kafka.ssl_keyfile)"
    if s.ssl_password and s.ssl_password_file:
        return "kafka.ssl_password_file", "give the key password once: UNLEARND_KAFKA_SSL_PASSWORD or the file"
    if s.sasl_password and s.sasl_password_file:
        return "kafka.sasl_password_file", "give the SASL password once: UNLEARND_KAFKA_SASL_PASSWORD or the file"
    if mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        if not s.sasl_username:
            return "kafka.sasl_username", f"{mech} needs a user name"
        if not (s.sasl_password or s.sasl_password_file):
            return "kafka.sasl_password_file", (f"{mech} needs a password: a file (kafka.sasl_password_file) or "
                                                f"UNLEARND_KAFKA_SASL_PASSWORD")
        if s.sasl_oauth_token_file:
            return "kafka.sasl_oauth_token_file", f"only OAUTHBEARER reads a token, not {mech}"
    if mech == "OAUTHBEARER":
        if not s.sasl_oauth_token_file:
            return "kafka.sasl_oauth_token_file", "OAUTHBEARER needs the file its token is read from"
        if s.sasl_username or s.sasl_password or s.sasl_password_file:
            return "kafka.sasl_username", "OAUTHBEARER takes a token (kafka.sasl_oauth_token_file), not a user/password"
    return None


def build_ssl_context(s: SecuritySettings) -> ssl.SSLContext:
    """The client TLS context: TLS 1.2 at least, the CA file (else the system's), hostname check, client cert, CRL."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = bool(s.ssl_check_hostname)
    try:
        if s.ssl_cafile:
            ctx.load_verify_locations(s.ssl_cafile)
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise KafkaSecurityError("kafka.ssl_cafile", f"cannot load CA certificates from {s.ssl_cafile}: {exc}") from exc
    if s.ssl_certfile:
        password = _read_secret("ssl_password", s.ssl_password, s.ssl_password_file)
        try:
            ctx.load_cert_chain(certfile=s.ssl_certfile, keyfile=s.ssl_keyfile or None, password=password)
        except (OSError, ssl.SSLError) as exc:
            raise KafkaSecurityError("kafka.ssl_certfile", f"cannot load the client certificate {s.ssl_certfile} "
                                     f"with its key (wrong kafka.ssl_password?): {exc}") from exc
    if s.ssl_crlfile:
        try:
            ctx.load_verify_locations(cafile=s.ssl_crlfile)
        except (OSError, ssl.SSLError) as exc:
            raise KafkaSecurityError("kafka.ssl_crlfile", f"cannot load {s.ssl_crlfile}: {exc}") from exc
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def client_kwargs(s: SecuritySettings) -> dict[str, Any]:
    """kafka-python's security arguments for these settings (the same for consumer, producer and admin client)."""
    out: dict[str, Any] = {"security_protocol": s.security_protocol}
    if s.security_protocol in ("SSL", "SASL_SSL"):
        out["ssl_context"] = build_ssl_context(s)
        out["ssl_check_hostname"] = bool(s.ssl_check_hostname)
    if s.security_protocol.startswith("SASL_"):
        out["sasl_mechanism"] = s.sasl_mechanism
        if s.sasl_mechanism == "OAUTHBEARER":
            out["sasl_oauth_token_provider"] = FileTokenProvider(s.sasl_oauth_token_file)
        else:
            out["sasl_plain_username"] = s.sasl_username
            out["sasl_plain_password"] = _read_secret("sasl_password", s.sasl_password, s.sasl_password_file)
    return out


def probe_tls(s: SecuritySettings, timeout_s: float = 5.0, context: ssl.SSLContext | None = None) -> None:
    """Handshake with each bootstrap server as the clients will; a refused certificate raises at once.

    kafka-python retries a failed handshake until its bootstrap timeout and then says only "Unable to bootstrap";
    this says which certificate check failed. A server that cannot be reached is left to the clients (it may be
    starting). Nothing to do without TLS.
    """
    if s.security_protocol not in ("SSL", "SASL_SSL"):
        return
    ctx = context or build_ssl_context(s)
    for server in (b.strip() for b in s.bootstrap.split(",") if b.strip()):
        host, _, port = server.rpartition(":")
        host = host.strip("[]")
        try:
            raw = socket.create_connection((host, int(port)), timeout=timeout_s)
        except (OSError, ValueError):
            continue
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.getpeercert()
            return
        except ssl.SSLCertVerificationError as exc:
            if "mismatch" in str(exc.verify_message):
                raise KafkaSecurityError("kafka.bootstrap", f"the certificate of {server} does not name {host} "
                                         f"({exc.verify_message}): connect by a name it carries (or, last resort, "
                                         f"kafka.ssl_check_hostname = false)") from exc
            hint = (f"is {s.ssl_cafile} the CA that signed the broker's certificate?" if s.ssl_cafile
                    else "no kafka.ssl_cafile is set, so only the system's CAs are trusted")
            raise KafkaSecurityError("kafka.ssl_cafile", f"the broker {server} presented a certificate that failed "
                                     f"verification ({exc.verify_message}); {hint}") from exc
        except ssl.SSLError as exc:
            raise KafkaSecurityError("kafka.security_protocol", f"TLS handshake with {server} failed ({exc.reason}): "
                                     f"does it speak TLS on this port?") from exc
        except TimeoutError as exc:   # a plain Kafka listener reads the ClientHello as a frame and waits for the rest
            raise KafkaSecurityError("kafka.security_protocol", f"{server} accepted the connection but sent no TLS "
                                     f"handshake in {timeout_s:.0f} s: does it speak TLS on this port?") from exc
        except OSError:
            continue
        finally:
            raw.close()
