"""Both registry engines behind one parametrised fixture (issue 24): the registry's tests run on each.

Both engines write a version the same way, into a local folder (the daemon's working copy, crash-safe by rename);
they differ in what readers read. With ``files`` readers read that folder. With ``s3`` the folder's versions are
pushed to a bucket (moto's real server) in the contract's order, and readers (``unlearnd serve``, ``unlearnd
registry``, a Triton server) read the bucket: a fresh local copy, pulled and hash-verified, the way
:class:`daemon.registry.mirror.RegistryMirror` gives it to them. A test writes into :attr:`RegistryStore.root`,
calls :meth:`RegistryStore.publish`, and checks what :meth:`RegistryStore.view` gives a reader; a fault is made in
the stored bytes with :meth:`RegistryStore.tamper`, in the folder or in the bucket.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.registry import LATEST_FILE, latest_version, list_versions, set_latest, verify_version
from daemon.registry.mirror import RegistryMirror
from daemon.registry.read import VersionInfo
from daemon.registry.remote import S3Location, pull_version, push_version
from tests.s3_harness import S3Endpoint

ENGINES = ["files", "s3"]


class RegistryStore:
    """A registry as one engine stores it; ``engine`` is ``files`` or ``s3``."""

    def __init__(self, engine: str, tmp_path: Path, s3: S3Endpoint | None = None) -> None:
        self.engine = engine
        self.root = tmp_path / "registry"          # where versions are written (the working copy)
        self.root.mkdir(parents=True, exist_ok=True)
        self.s3 = s3
        self.loc = S3Location(s3.bucket, "models/") if s3 is not None else None
        self._scratch = tmp_path / "readers"
        self._views = 0

    @property
    def url(self) -> str:
        """What ``--registry`` names for a reader of this store."""
        return str(self.root) if self.s3 is None else f"s3://{self.loc.bucket}/{self.loc.prefix}"

    def cli_args(self) -> list[str]:
        """``unlearnd registry``'s options that point it at this store."""
        extra = [] if self.s3 is None else ["--s3-endpoint-url", self.s3.endpoint_url]
        return ["--registry", self.url, *extra]

    def publish(self, model: str) -> None:
        """Make the working copy's versions visible to readers: push each one the bucket lacks (files, manifest),
        then ``LATEST`` as the working copy names it (``files``: nothing to do, readers read the folder)."""
        if self.s3 is None:
            return
        client = self.s3.client()
        for v in list_versions(self.root, model):
            push_version(client, self.loc, self.root, model, v, set_latest=False)
        latest = latest_version(self.root, model)
        if latest is not None:
            push_version(client, self.loc, self.root, model, latest)

    def _fresh(self) -> Path:
        self._views += 1
        path = self._scratch / str(self._views)
        shutil.rmtree(path, ignore_errors=True)
        return path

    def view(self, model: str) -> Path:
        """The registry folder a reader loads from: the folder itself, or a fresh copy of the bucket (``LATEST``
        and every complete version, each verified on the way in; a fault raises as it would for a server)."""
        if self.s3 is None:
            return self.root
        mirror = RegistryMirror(self.s3.client(), self.loc, self._fresh())
        for v in mirror.versions(model):
            pull_version(mirror.client, self.loc, mirror.local, model, v)
        latest = mirror.latest(model)
        if latest is not None:        # the bucket's LATEST, which may name an older version than the newest
            set_latest(mirror.local, model, latest)
        return mirror.local

    def server_cache(self, model: str) -> tuple[Path, Callable[[], object] | None]:
        """What ``unlearnd serve`` reads: (the folder its holder loads from, the watcher's ``sync``). On S3 the
        folder is an empty cache and the sync follows the bucket's ``LATEST`` into it, as the server does."""
        if self.s3 is None:
            return self.root, None
        mirror = RegistryMirror(self.s3.client(), self.loc, self._fresh())
        return mirror.local, lambda: mirror.follow_latest(model)

    def verify(self, model: str, version: int) -> VersionInfo:
        """One version as a reader checks it (raises VerificationError naming the file)."""
        if self.s3 is None:
            return verify_version(self.root, model, version)
        local = self._fresh()
        pull_version(self.s3.client(), self.loc, local, model, version)
        return verify_version(local, model, version)

    def _key(self, model: str, version: int | None, name: str) -> str:
        return self.loc.key(model, name) if version is None else self.loc.key(model, str(version), name)

    def stored(self, model: str, version: int | None, name: str) -> bytes:
        """A stored file's bytes (``version`` None: a model-level file such as ``LATEST``)."""
        if self.s3 is None:
            return (self.root / model / ("" if version is None else str(version)) / name).read_bytes()
        obj = self.s3.client().get_object(Bucket=self.loc.bucket, Key=self._key(model, version, name))
        return obj["Body"].read()

    def tamper(self, model: str, version: int | None, name: str,
               change: Callable[[bytes], bytes | None]) -> None:
        """Replace a stored file by ``change(its bytes)``; None deletes it."""
        data = change(self.stored(model, version, name))
        if self.s3 is None:
            path = self.root / model / ("" if version is None else str(version)) / name
            path.unlink() if data is None else path.write_bytes(data)
            return
        client, key = self.s3.client(), self._key(model, version, name)
        if data is None:
            client.delete_object(Bucket=self.loc.bucket, Key=key)
        else:
            client.put_object(Bucket=self.loc.bucket, Key=key, Body=data)

    def move_latest(self, model: str, version: int) -> None:
        """Point the stored ``LATEST`` at ``version`` by hand (no checks): a fault or an operator's edit."""
        self.tamper(model, None, LATEST_FILE, lambda _old: f"{version}\n".encode())


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RegistryStore:
    """The one parametrised fixture the registry's tests run through: a folder, and a folder pushed to S3."""
    if request.param == "s3":
        return RegistryStore("s3", tmp_path, request.getfixturevalue("s3"))
    return RegistryStore("files", tmp_path)
