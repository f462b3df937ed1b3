"""The daemon's, the servers' and the CLI's one handle on a registry published to S3 (``registry.url = "s3://…"``).

Why one small object: the commit path, the recovery, the serving watcher and ``unlearnd registry`` all need the
same four acts (push a version that is complete locally, pull the bucket's ``LATEST`` into a local copy, bring a
bucket that lags the local copy up to it, read the bucket's ``LATEST``), and the daemon's commit path must change
by a few lines only. Everything else keeps working on a local directory, the working copy (or a server's
cache), which stays crash-safe by rename; the bucket is its mirror, written in the contract's order by
:func:`daemon.registry.remote.push_version` (files, manifest create-only, ``LATEST`` last).

``registry.url`` empty or ``file://`` means no mirror: :func:`open_mirror` returns None and the registry is the
local folder, as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from daemon.registry.layout import MANIFEST_FILE, RegistryError
from daemon.registry.read import VersionInfo, latest_version, list_versions, verify_version
from daemon.registry.remote import (
    Hook,
    RemoteConfigError,
    S3Location,
    check_reachable,
    make_client,
    parse_registry_url,
    pull_version,
    push_version,
    remote_latest,
)
from daemon.registry.write import set_latest

__all__ = ["RegistryMirror", "check_endpoint_url", "open_mirror", "resolve_registry"]


def check_endpoint_url(endpoint_url: str, setting: str = "registry.endpoint_url") -> None:
    """Empty (AWS's endpoints) or ``http(s)://host[:port]``; raises RemoteConfigError naming ``setting``."""
    if not endpoint_url:
        return
    parts = urlsplit(endpoint_url)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment:
        raise RemoteConfigError(f"{setting} {endpoint_url!r}: must be http(s)://host[:port]")


def resolve_registry(url: str, directory: Path | str) -> tuple[Path, S3Location | None]:
    """(the local registry folder, the bucket location or None) for ``registry.url`` and ``registry.dir``.

    ``file:///path`` names the folder itself (``registry.dir`` is then unused); ``s3://`` keeps ``registry.dir``
    as the working copy. Raises RemoteConfigError naming ``registry.url`` (no I/O)."""
    if not url:
        return Path(directory), None
    where = parse_registry_url(url)
    if isinstance(where, Path):
        return where, None
    return Path(directory), where


class RegistryMirror:
    """A bucket location mirroring a local registry folder.

    Arguments:
        client: a boto3 S3 client (:func:`daemon.registry.remote.make_client`).
        loc: the bucket and prefix.
        local: the local folder: the daemon's working copy, a server's cache, the CLI's scratch copy.
    """

    def __init__(self, client: Any, loc: S3Location, local: Path | str) -> None:
        self.client = client
        self.loc = loc
        self.local = Path(local)

    @property
    def url(self) -> str:
        return f"s3://{self.loc.bucket}/{self.loc.prefix}"

    def check(self) -> None:
        """The bucket answers (else RemoteConfigError naming registry.url or registry.endpoint_url)."""
        check_reachable(self.client, self.loc)

    def latest(self, model: str) -> int | None:
        """The version the bucket's ``LATEST`` names."""
        return remote_latest(self.client, self.loc, model)

    def publish(self, model: str, version: int, *, hook: Hook | None = None,
                before_latest: Callable[[], None] | None = None) -> None:
        """Push a version complete in the local copy: files, manifest, then ``LATEST`` (and Triton's config).

        Idempotent (a re-push after a crash completes it). ``hook(step)`` runs before each step (the daemon's
        failpoints); ``before_latest()`` runs just before the bucket's ``LATEST`` moves and may raise to stop it
        (the ownership fence, :func:`daemon.pipeline.ownership.check_publish`)."""
        def step(name: str) -> None:
            if hook is not None:
                hook(name)
            if name == "latest" and before_latest is not None:
                before_latest()

        push_version(self.client, self.loc, self.local, model, version, hook=step)

    def catch_up(self, model: str, *, hook: Hook | None = None) -> int | None:
        """Push the local ``LATEST`` when the bucket lacks it (its first version, one written before a crash)."""
        local = latest_version(self.local, model)
        remote = self.latest(model)
        if local is None or (remote is not None and remote >= local):
            return None
        self.publish(model, local, hook=hook)
        return local

    def pull_latest(self, model: str) -> int | None:
        """Bring the bucket's ``LATEST`` into the local copy (hashes verified, never a half version) and move the
        local ``LATEST`` to it, forward only. Returns the version pulled, or None when there was nothing newer."""
        remote = self.latest(model)
        if remote is None:
            return None
        local = latest_version(self.local, model)
        if local is not None and local >= remote:
            return None
        self._pull(model, remote)
        set_latest(self.local, model, remote)
        return remote

    def follow_latest(self, model: str) -> int | None:
        """A reader's sync (``unlearnd serve``): make the local ``LATEST`` name what the bucket's names, pulling that
        version (verified) if the cache lacks it, in either direction. A ``LATEST`` moved backwards in the bucket
        thus reaches the server's own rule (refused, logged and counted, the newer version kept serving), as it
        would in a folder; the daemon's working copy uses :meth:`pull_latest`, which only moves forward."""
        remote = self.latest(model)
        if remote is None or latest_version(self.local, model) == remote:
            return None
        self._pull(model, remote)
        set_latest(self.local, model, remote)
        return remote

    def _pull(self, model: str, version: int) -> None:
        try:
            pull_version(self.client, self.loc, self.local, model, version)
        except OSError:         # another process pulled it into the same folder first (rename onto it)
            verify_version(self.local, model, version)

    def versions(self, model: str) -> list[int]:
        """The versions the bucket holds a manifest for (complete ones), ascending."""
        prefix = self.loc.key(model) + "/"
        found: set[int] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.loc.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                parts = obj["Key"][len(prefix):].split("/")
                if len(parts) == 2 and parts[1] == MANIFEST_FILE and parts[0].isdigit():
                    found.add(int(parts[0]))
        return sorted(found)

    def pull_round(self, model: str, round_id: str) -> VersionInfo | None:
        """The version a round wrote, pulled from the bucket when the local copy lacks it (a working copy lost, or
        another host's); its local ``LATEST`` is left to the caller. None if the bucket has no such version."""
        local = set(list_versions(self.local, model))
        for v in reversed(self.versions(model)):
            if v in local:
                continue
            raw = self.client.get_object(Bucket=self.loc.bucket, Key=self.loc.key(model, str(v), MANIFEST_FILE))
            if json.loads(raw["Body"].read()).get("round_id") == round_id:
                pull_version(self.client, self.loc, self.local, model, v)
                return verify_version(self.local, model, v)
        return None

    def pull_all(self, model: str) -> tuple[list[int], dict[int, str]]:
        """Pull every version the bucket holds a manifest for (``unlearnd registry`` on a URL): (pulled, failed
        with why). ``LATEST`` of the local copy is set to the bucket's."""
        pulled, failed = [], {}
        for v in self.versions(model):
            try:
                pull_version(self.client, self.loc, self.local, model, v)
                pulled.append(v)
            except (RegistryError, ValueError) as exc:
                failed[v] = str(exc)
        remote = self.latest(model)
        if remote is not None and remote in list_versions(self.local, model):
            set_latest(self.local, model, remote, verify=False)
        return pulled, failed


def open_mirror(url: str, local: Path | str, *, endpoint_url: str = "", region: str = "",
                check: bool = True) -> RegistryMirror | None:
    """The mirror ``registry.url`` names over ``local``, or None (no URL, or a ``file://`` one).

    With ``check``, the bucket is reached once (HEAD): an unreachable endpoint, a missing bucket or refused
    credentials raise RemoteConfigError naming the setting, so commands exit 2 before doing anything."""
    _local, loc = resolve_registry(url, local)
    if loc is None:
        return None
    check_endpoint_url(endpoint_url)
    mirror = RegistryMirror(make_client(endpoint_url or None, region or None), loc, local)
    if check:
        mirror.check()
    return mirror
