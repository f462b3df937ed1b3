"""The daemon's two secrets, each a 32-byte key in a file: one seals the continual state at rest, one keys hashes.

Why: whoever can read the registry (every serving replica, a Triton server) could read each version's
continual state (the subspace memory spans exactly the features of the instances a round forgot) and test
whether an image was forgotten; and a plain SHA-256 of a guessable instance id (``"A1-user/3"``) is
confirmed from a receipt. So:

* the **state key** seals ``session.safetensors`` and ``session.json`` with AES-256-GCM
  (:func:`seal` / :func:`open_sealed`); the authenticated data names the model, the version and the file,
  so a ciphertext cannot be moved to another file, version or model. Servers never need it.
* the **id key** turns instance ids and content hashes into HMAC-SHA256 digests (:func:`keyed_digest`),
  written ``hmac-sha256:<key id>:<hex>`` so that every stored digest says which key made it (a digest
  without the prefix is a plain SHA-256 written before keyed hashes).

A key file holds 64 hex characters (``openssl rand -hex 32``). A key's *id* (16 hex characters,
:attr:`SecretKey.key_id`) is an HMAC of a constant under the key: it names the key in manifests, receipts and
logs and reveals nothing of it. With no file configured the daemon makes one on first start in its state
directory (:func:`load_or_create_key`, mode 0600, created atomically so two processes agree on one key).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DIGEST_PREFIX",
    "DaemonKeys",
    "KeyFileError",
    "SealError",
    "SecretKey",
    "digest_key_id",
    "keyed_digest",
    "load_or_create_key",
    "loose_permissions",
    "open_sealed",
    "read_key",
    "seal",
    "sealed_key_id",
]

KEY_BYTES = 32
DIGEST_PREFIX = "hmac-sha256"
_MAGIC = b"UNLSEAL1"            # what a sealed blob starts with, then the key id (16 ascii), the nonce, the data
_NONCE_BYTES = 12
_KEY_ID_LEN = 16


class KeyFileError(ValueError):
    """A key file is missing, unreadable or malformed; the message names the file and the fix."""


class SealError(ValueError):
    """A sealed blob cannot be opened: another key sealed it, or it was altered or moved (another file/version)."""


@dataclass(frozen=True)
class SecretKey:
    """A 32-byte secret and what it is for (``state`` or ``id``); its repr never shows the material."""

    purpose: str
    material: bytes = field(repr=False)
    source: str = ""            # the file it came from, for messages

    def __post_init__(self) -> None:
        if len(self.material) != KEY_BYTES:
            raise KeyFileError(f"a {self.purpose} key is {KEY_BYTES} bytes, got {len(self.material)}")

    @property
    def key_id(self) -> str:
        """16 hex characters naming the key (an HMAC of a constant under it: says nothing of the key)."""
        return hmac.new(self.material, b"unlearnd.key-id", hashlib.sha256).hexdigest()[:_KEY_ID_LEN]


def _parse(text: str, path: Path, purpose: str) -> SecretKey:
    body = text.strip()
    try:
        material = bytes.fromhex(body)
    except ValueError:
        material = b""
    if len(body) != 2 * KEY_BYTES or len(material) != KEY_BYTES:
        raise KeyFileError(f"{path}: a {purpose} key file holds {2 * KEY_BYTES} hex characters ({KEY_BYTES} random "
                           f"bytes; make one with `openssl rand -hex {KEY_BYTES}`), got {len(body)} characters")
    return SecretKey(purpose, material, str(path))


def read_key(path: Path | str, purpose: str) -> SecretKey:
    """The key in ``path``; :class:`KeyFileError` when the file is missing or is not 64 hex characters."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {purpose} key file (make one with "
                           f"`openssl rand -hex {KEY_BYTES} > {path}; chmod 600 {path}`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: the {purpose} key file cannot be read: {exc}") from None
    return _parse(text, path, purpose)


def loose_permissions(path: Path | str) -> bool:
    """True when group or others may read the key file (the daemon warns: a key is only as secret as its file)."""
    return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def load_or_create_key(path: Path | str, purpose: str) -> tuple[SecretKey, bool]:
    """The key in ``path``, made first (random, mode 0600) when there is none; True when it was made now.

    Crash-safe and race-free: the key is written and fsynced under a temporary name, then hard-linked to
    ``path`` (which fails if another process made it first; its key is then read and used).
    """
    path = Path(path)
    if path.exists():
        return read_key(path, purpose), False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            made = True
        except FileExistsError:
            made = False
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return read_key(path, purpose), made


def seal(key: SecretKey, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM of ``plaintext`` bound to ``aad``: magic, the key id, a random nonce, ciphertext and tag."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return _MAGIC + key.key_id.encode("ascii") + nonce + AESGCM(key.material).encrypt(nonce, plaintext, aad)


def sealed_key_id(blob: bytes) -> str | None:
    """The id of the key that sealed ``blob``, or None when it is not a sealed blob."""
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _KEY_ID_LEN + _NONCE_BYTES + 16:
        return None
    return blob[len(_MAGIC):len(_MAGIC) + _KEY_ID_LEN].decode("ascii", "replace")


def open_sealed(key: SecretKey, blob: bytes, aad: bytes, what: str) -> bytes:
    """The plaintext of a :func:`seal` blob; :class:`SealError` naming ``what`` and why when it cannot be opened."""
    kid = sealed_key_id(blob)
    if kid is None:
        raise SealError(f"{what}: not a sealed file (no {_MAGIC.decode()} header)")
    if kid != key.key_id:
        raise SealError(f"{what}: sealed with state key {kid}, but the configured state key is {key.key_id} "
                        f"({key.source or 'in memory'}); configure the key that sealed it")
    start = len(_MAGIC) + _KEY_ID_LEN
    nonce, data = blob[start:start + _NONCE_BYTES], blob[start + _NONCE_BYTES:]
    try:
        return AESGCM(key.material).decrypt(nonce, data, aad)
    except InvalidTag:
        raise SealError(f"{what}: authentication failed: the file was altered, or moved from another file, "
                        f"version or model") from None


def keyed_digest(key: SecretKey, domain: bytes, data: bytes) -> str:
    """``hmac-sha256:<key id>:<hex>`` of ``data`` under ``key``, in ``domain`` (ids and contents never collide)."""
    mac = hmac.new(key.material, domain + b"\0" + data, hashlib.sha256).hexdigest()
    return f"{DIGEST_PREFIX}:{key.key_id}:{mac}"


def digest_key_id(digest: str) -> tuple[str | None, str]:
    """(key id, hex) of a stored digest: (None, hex) for a plain SHA-256 (written before keyed digests)."""
    if digest.startswith(DIGEST_PREFIX + ":"):
        _, kid, mac = digest.split(":", 2)
        return kid, mac
    return None, digest


@dataclass(frozen=True)
class DaemonKeys:
    """The daemon's two keys: ``state`` seals the continual state, ``ids`` keys instance and content digests."""

    state: SecretKey
    ids: SecretKey
