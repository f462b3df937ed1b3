"""Bearer tokens and TLS for unlearnd's HTTP endpoints (``unlearnd serve`` and the daemon's ``/metrics``).

One shared secret, read from a file that only the operator's secret store writes (a Kubernetes Secret, a
systemd credential): never from the command line (it would show in ``ps``) and never logged. A request
proves it holds the token with ``Authorization: Bearer <token>``; the comparison takes the same time
whatever the guess (``hmac.compare_digest``).

401, never 403: a missing or wrong token is an authentication failure (RFC 9110 §15.5.2, RFC 6750 §3.1) and
is answered ``401`` with ``WWW-Authenticate: Bearer``. 403 would mean "you are who you say, but may not",
and there is only one token with one scope, so that case does not arise.
"""

from __future__ import annotations

import hmac
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MIN_TOKEN_CHARS", "TlsFiles", "check_bearer", "read_token_file", "server_ssl_context",
           "unauthorized_header"]

#: shorter tokens are refused at start-up: a guessable secret is no secret
MIN_TOKEN_CHARS = 16
_MAX_TOKEN_BYTES = 4096


def read_token_file(path: str | os.PathLike[str], *, what: str = "--token-file") -> str:
    """The token in ``path`` (surrounding whitespace stripped). ValueError naming ``what`` when the file is
    missing, empty, too short, too long or not one printable ASCII line; the message never holds the token."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {p}: cannot read it: {exc.strerror or exc}") from None
    if len(raw) > _MAX_TOKEN_BYTES:
        raise ValueError(f"{what} {p}: {len(raw)} bytes; a token file holds one token (at most {_MAX_TOKEN_BYTES})")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{what} {p}: the token must be printable ASCII (e.g. openssl rand -hex 32)") from None
    if not token:
        raise ValueError(f"{what} {p}: the file is empty")
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError(f"{what} {p}: the token must be one line of printable ASCII without spaces")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{what} {p}: the token has {len(token)} characters, at least {MIN_TOKEN_CHARS} are "
                         f"needed (e.g. openssl rand -hex 32)")
    return token


def token_file_is_shared(path: str | os.PathLike[str]) -> bool:
    """True when others than the owner and group may read the token file (worth a warning, not a refusal:
    a Kubernetes Secret volume is 0644 unless its defaultMode says otherwise)."""
    try:
        return bool(Path(path).stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def check_bearer(authorization: str | None, token: str) -> bool:
    """True when the ``Authorization`` header carries ``Bearer <token>`` (scheme case-insensitive), compared
    in constant time so the answer's timing says nothing about how much of a guess was right."""
    if not authorization:
        return False
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode("utf-8", "replace"), token.encode("ascii"))


def unauthorized_header(authorization: str | None, realm: str) -> str:
    """The ``WWW-Authenticate`` value of a 401: RFC 6750's ``invalid_token`` when a token was presented."""
    if authorization:
        return f'Bearer realm="{realm}", error="invalid_token"'
    return f'Bearer realm="{realm}"'


@dataclass(frozen=True)
class TlsFiles:
    """A server's TLS files: its certificate chain and key, and optionally the CA whose client certificates
    it accepts (mutual TLS; ``client_auth_required`` refuses clients without one)."""

    certfile: Path | None = None
    keyfile: Path | None = None
    client_cafile: Path | None = None
    client_auth_required: bool = False

    def __post_init__(self) -> None:
        for name in ("certfile", "keyfile", "client_cafile"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("TLS needs both a certificate file and a key file (or neither)")
        if self.certfile is None and self.client_cafile is not None:
            raise ValueError("a client CA file (mutual TLS) needs TLS: give a certificate and a key file too")
        if self.client_auth_required and self.client_cafile is None:
            raise ValueError("requiring client certificates needs the client CA file that signs them")

    @property
    def enabled(self) -> bool:
        return self.certfile is not None


def server_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """A TLS 1.2+ server context for ``tls`` (ValueError naming the file that cannot be used)."""
    if not tls.enabled:
        raise ValueError("TLS is not configured")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.certfile), str(tls.keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS certificate {tls.certfile} / key {tls.keyfile}: cannot load them: {exc}") from None
    if tls.client_cafile is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.client_cafile))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"TLS client CA {tls.client_cafile}: cannot load it: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth_required else ssl.CERT_OPTIONAL
    return ctx
