"""The registry on S3-compatible object storage (``registry.url = "s3://bucket/prefix"``): push a version that
is complete in the local working copy, pull one into it, and read the bucket's ``LATEST``.

Why this shape: the rest of the daemon keeps working on a local directory (the working copy, crash-safe by
rename); the bucket is a mirror published in the contract's order. Objects appear atomically per key, so a
version's files go first, its ``manifest.json`` after them (written with ``If-None-Match: *`` so two writers can
never both create version N), and ``LATEST`` last of all. Readers trust only what ``LATEST`` names and verify
every file's sha256 against the manifest before the version enters the local copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from daemon.registry.files import _atomic_write_bytes, _ensure_dir, _fsync_dir, _sha256_bytes, _write_durable
from daemon.registry.layout import (
    CONFIG_FILE,
    LABELS_FILE,
    LATEST_FILE,
    MANIFEST_FILE,
    RegistryError,
    VerificationError,
    _VERSION_RE,
    _check_model_name,
    _check_version,
    _model_dir,
    _version_dir,
)
from daemon.registry.read import verify_version

Hook = Callable[[str], None]


class RemoteConfigError(RegistryError):
    """The registry URL or the object store it names is unusable; the message names the setting."""


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix ("" or ending in "/")."""

    bucket: str
    prefix: str

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)


def parse_registry_url(url: str) -> Path | S3Location:
    """``file:///path`` or a plain path gives a local directory; ``s3://bucket[/prefix]`` a bucket location.

    Raises RemoteConfigError naming ``registry.url`` for anything else, so the CLI can exit 2."""
    if not isinstance(url, str) or not url.strip():
        raise RemoteConfigError("registry.url must be a non-empty path, file:// or s3:// URL")
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise RemoteConfigError(f"registry.url {url!r}: file:// URLs take no host")
        return Path(path)
    if parsed.scheme != "s3":
        raise RemoteConfigError(f"registry.url {url!r}: scheme must be file:// or s3://, got {parsed.scheme!r}")
    bucket = parsed.netloc
    if not bucket or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789.-" for c in bucket) or len(bucket) < 3:
        raise RemoteConfigError(f"registry.url {url!r}: bucket name {bucket!r} is not a valid S3 bucket name")
    prefix = parsed.path.strip("/")
    if parsed.query or parsed.fragment or ".." in prefix.split("/"):
        raise RemoteConfigError(f"registry.url {url!r}: no query, fragment or '..' allowed")
    return S3Location(bucket, prefix + "/" if prefix else "")


def make_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client; credentials come from boto3's standard chain (env, files), never the TOML."""
    import boto3
    from botocore.config import Config

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region,
                        config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                      connect_timeout=5, read_timeout=30))


def check_reachable(client: Any, loc: S3Location) -> None:
    """Fail early with the setting to fix when the endpoint, bucket or credentials are wrong."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        client.head_bucket(Bucket=loc.bucket)
    except NoCredentialsError as exc:
        raise RemoteConfigError("registry.url: no S3 credentials found (boto3's chain: AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, an instance role)") from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        what = {"404": "does not exist", "NoSuchBucket": "does not exist",
                "403": "access denied (check the AWS credentials)"}.get(code, f"error {code}")
        raise RemoteConfigError(f"registry.url: bucket {loc.bucket!r} {what}") from exc
    except BotoCoreError as exc:
        raise RemoteConfigError(f"registry.endpoint_url: cannot reach the object store: {exc}") from exc


def _get(client: Any, loc: S3Location, key: str) -> bytes | None:
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=loc.bucket, Key=loc.key(key))["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise


def remote_latest(client: Any, loc: S3Location, model: str) -> int | None:
    """The version the bucket's ``LATEST`` names, or None."""
    data = _get(client, loc, f"{_check_model_name(model)}/{LATEST_FILE}")
    if data is None:
        return None
    text = data.decode("ascii", "replace").strip()
    if not _VERSION_RE.fullmatch(text):
        raise RegistryError(f"s3://{loc.bucket}/{loc.key(model, LATEST_FILE)} does not hold a version number")
    return int(text)


def _put_create_only(client: Any, loc: S3Location, key: str, body: bytes, model: str, version: int) -> None:
    """Put ``key`` only if absent (``If-None-Match: *``); an existing object with the same bytes is a re-push
    after a crash (fine), one with other bytes belongs to another writer's version N (refused)."""
    from botocore.exceptions import ClientError

    try:
        client.put_object(Bucket=loc.bucket, Key=loc.key(key), Body=body, IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
            raise
        if _get(client, loc, key) != body:
            raise RegistryError(f"model {model!r} version {version} already exists in the bucket with other "
                                f"contents ({key}): another writer published it") from exc


def push_version(client: Any, loc: S3Location, registry: Path | str, model: str, version: int, *,
                 set_latest: bool = True, hook: Hook | None = None) -> None:
    """Publish a locally complete version: its files, then its manifest (create-only), then ``LATEST``.

    Idempotent: re-pushing the same version (a restart after a crash between steps) completes it; a different
    manifest already at version N is refused (another writer won N). ``hook(step)`` runs before each step
    (``files``, ``manifest``, ``latest``) so tests and the fencing check can stop or refuse there."""
    info = verify_version(registry, model, version)
    step = hook or (lambda _s: None)
    step("files")
    for name in sorted(info.manifest["files"]):   # create-only too: a loser must not overwrite the winner's
        _put_create_only(client, loc, f"{model}/{version}/{name}", (info.path / name).read_bytes(), model, version)
    labels = _model_dir(registry, model) / LABELS_FILE     # model-level, beside the version directories
    if labels.is_file():
        client.put_object(Bucket=loc.bucket, Key=loc.key(model, LABELS_FILE), Body=labels.read_bytes())
    step("manifest")
    _put_create_only(client, loc, f"{model}/{version}/{MANIFEST_FILE}", (info.path / MANIFEST_FILE).read_bytes(),
                     model, version)
    if set_latest:
        step("latest")
        client.put_object(Bucket=loc.bucket, Key=loc.key(model, LATEST_FILE), Body=f"{version}\n".encode())
        config = _model_dir(registry, model) / CONFIG_FILE
        if config.is_file():       # after LATEST: Triton loads only the version LATEST names (contract §4)
            client.put_object(Bucket=loc.bucket, Key=loc.key(model, CONFIG_FILE),
                              Body=pin_version(config.read_bytes(), version))


_POLICY = re.compile(rb"(?m)^version_policy:.*\n?")


def pin_version(config: bytes, version: int) -> bytes:
    """Triton's ``config.pbtxt`` with ``version_policy: { specific: { versions: [N] } }``: a Triton server pointed
    at the bucket loads the version ``LATEST`` names, never a higher version directory still being uploaded."""
    base = _POLICY.sub(b"", config).rstrip(b"\n")
    return base + f"\nversion_policy: {{ specific: {{ versions: [ {version} ] }} }}\n".encode()


def unpin_version(config: bytes) -> bytes:
    """The local copy's ``config.pbtxt``: the bucket's without the pin (the local folder is read by LATEST)."""
    return _POLICY.sub(b"", config).rstrip(b"\n") + b"\n"


def pull_version(client: Any, loc: S3Location, registry: Path | str, model: str, version: int) -> Path:
    """Copy a complete version from the bucket into the local copy, verifying every sha256 before it appears
    (hidden temporary, then rename), and return its directory. An existing local version is kept as is."""
    _check_version(version)
    final = _version_dir(registry, model, version)
    if final.is_dir():
        verify_version(registry, model, version)
        return final
    raw = _get(client, loc, f"{model}/{version}/{MANIFEST_FILE}")
    if raw is None:
        raise RegistryError(f"model {model!r} version {version} has no manifest in s3://{loc.bucket}/{loc.prefix}")
    manifest = json.loads(raw)
    model_dir = _model_dir(registry, model)
    _ensure_dir(model_dir)
    tmp = model_dir / f".tmp-pull-{version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, entry in sorted(manifest.get("files", {}).items()):
            if "/" in name or name.startswith("."):
                raise VerificationError(model, version, name, "unsafe file name in the bucket's manifest")
            data = _get(client, loc, f"{model}/{version}/{name}")
            if data is None:
                raise VerificationError(model, version, name, "missing in the bucket")
            if _sha256_bytes(data) != entry.get("sha256"):
                raise VerificationError(model, version, name, "sha256 does not match the manifest (bucket)")
            _write_durable(tmp / name, data)
        _write_durable(tmp / MANIFEST_FILE, raw)
        _fsync_dir(tmp)
        for name in (CONFIG_FILE, LABELS_FILE):      # visible files: replaced whole, never seen half-written
            data = _get(client, loc, f"{model}/{name}")
            if data is not None and not (model_dir / name).exists():
                _atomic_write_bytes(model_dir / name, unpin_version(data) if name == CONFIG_FILE else data)
        tmp.rename(final)
        _fsync_dir(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verify_version(registry, model, version)
    return final
