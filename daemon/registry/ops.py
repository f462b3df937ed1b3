"""The registry for operators: serving leases, retention, rollback, and whole-model verification.

Shared by the daemon (retention after each publish) and the server (leases), and behind
``unlearnd registry list|show|verify|rollback|prune``. It builds on ``daemon.registry``, which owns the
crash-safe writing; this module only decides *what* to keep, copy or check.

Leases. A server that holds a version in memory writes ``<registry>/<model>/.served/<server-id>.json``
(``{"version", "loading", "expires_at", ...}``) and refreshes it well before it expires; retention never
deletes a version a live lease names, nor the one ``LATEST`` names, nor the newest ``keep``. A server
that dies stops refreshing, so its lease expires and stops protecting anything. Triton ignores
dot-prefixed entries, so ``.served/`` never looks like a version to it.

Rollback. History only grows: rolling back to V writes V's files (weights, TorchScript, and the session
state beside them, so a daemon restart continues from V) as a *new* version whose ``parent`` is the
version it replaced, and records ``rollback: {"to": V, "from": parent, ...}``. Because a rollback undoes
the unlearning done after V, the manifest also lists the request ids whose forgetting it reverts
(``reverted_request_ids``), so they can be applied again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import registry
from daemon.registry import RegistryError, VersionInfo

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_LEASE_TTL_S",
    "LEASE_DIR",
    "Lease",
    "PruneResult",
    "VerifyResult",
    "check_deep",
    "check_latest",
    "default_server_id",
    "forgotten_request_ids",
    "live_leases",
    "prune",
    "read_leases",
    "release_lease",
    "rollback",
    "verify_all",
    "write_lease",
]

LEASE_DIR = ".served"
DEFAULT_KEEP = 10
DEFAULT_LEASE_TTL_S = 30.0
_SERVER_ID_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")
_PRUNE_PREFIX = ".tmp-pruned-"   # registry.clean_temporaries removes what a crash mid-prune leaves
# An expired lease file is only housekeeping once it has been dead this long (a clock step, a paused VM).
_LEASE_GC_GRACE_S = 3600.0


# -- leases -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lease:
    """One server's claim on the versions it serves (and the one it is loading, if any)."""

    server_id: str
    version: int | None
    loading: int | None
    expires_at: float
    updated_at: float
    host: str = ""
    pid: int = 0

    def live(self, now: float) -> bool:
        return self.expires_at > now

    @property
    def versions(self) -> set[int]:
        return {v for v in (self.version, self.loading) if v is not None}


def default_server_id(port: int | None = None) -> str:
    """``<host>-<pid>[-<port>]`` with anything unsafe in the host name replaced: unique per process."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "_", socket.gethostname())[:64] or "host"
    sid = f"{host}-{os.getpid()}" + (f"-{port}" if port is not None else "")
    return sid.lstrip(".") or f"server-{uuid.uuid4().hex[:8]}"


def _check_server_id(server_id: str) -> str:
    if not isinstance(server_id, str) or not _SERVER_ID_RE.fullmatch(server_id):
        raise ValueError(f"server id must be 1-128 letters, digits, '-', '_' or '.', not starting with '.', "
                         f"got {server_id!r}")
    return server_id


def _lease_dir(registry_dir: Path | str, model: str) -> Path:
    return Path(registry_dir) / model / LEASE_DIR


def write_lease(registry_dir: Path | str, model: str, server_id: str, *, version: int | None,
                loading: int | None = None, ttl_s: float = DEFAULT_LEASE_TTL_S,
                now: float | None = None) -> Lease:
    """Create or refresh this server's lease (atomic replace); it protects its versions for ``ttl_s``."""
    _check_server_id(server_id)
    if not ttl_s > 0:
        raise ValueError(f"lease ttl must be > 0 seconds, got {ttl_s!r}")
    for what, v in (("version", version), ("loading", loading)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"lease {what} must be a version >= 1 or None, got {v!r}")
    t = time.time() if now is None else now
    lease = Lease(server_id=server_id, version=version, loading=loading, expires_at=t + ttl_s, updated_at=t,
                  host=socket.gethostname(), pid=os.getpid())
    directory = _lease_dir(registry_dir, model)
    directory.mkdir(parents=True, exist_ok=True)
    body = {"server_id": server_id, "version": version, "loading": loading, "expires_at": lease.expires_at,
            "updated_at": t, "host": lease.host, "pid": lease.pid}
    # Atomic (a reader never sees half a lease) but not fsynced: a lease is worth nothing after a crash of
    # the server that holds it, and a server writes one before each load, where two fsyncs (1-7 ms on this
    # disk) would delay the swap. A lease a crash left empty or torn reads as no lease.
    registry.atomic_write_bytes(directory / f"{server_id}.json", json.dumps(body, sort_keys=True).encode(),
                                durable=False)
    return lease


def release_lease(registry_dir: Path | str, model: str, server_id: str) -> None:
    """Remove this server's lease (at a clean stop); a missing lease is not an error."""
    (_lease_dir(registry_dir, model) / f"{_check_server_id(server_id)}.json").unlink(missing_ok=True)


def _parse_lease(path: Path) -> Lease | None:
    try:
        raw = json.loads(path.read_bytes())
        return Lease(server_id=str(raw["server_id"]), version=raw.get("version"), loading=raw.get("loading"),
                     expires_at=float(raw["expires_at"]), updated_at=float(raw.get("updated_at", 0.0)),
                     host=str(raw.get("host", "")), pid=int(raw.get("pid", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None   # half-read or foreign: protects nothing, and prune leaves it alone


def read_leases(registry_dir: Path | str, model: str) -> list[Lease]:
    """Every readable lease of the model, live or expired, by server id."""
    directory = _lease_dir(registry_dir, model)
    if not directory.is_dir():
        return []
    leases = [_parse_lease(p) for p in sorted(directory.glob("*.json")) if not p.name.startswith(".")]
    return [lease for lease in leases if lease is not None]


def live_leases(registry_dir: Path | str, model: str, *, now: float | None = None) -> list[Lease]:
    t = time.time() if now is None else now
    return [lease for lease in read_leases(registry_dir, model) if lease.live(t)]


# -- retention ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneResult:
    """What a prune did (or, with ``dry_run``, would do).

    Attributes:
        deleted: versions removed, ascending.
        kept: versions still there, ascending.
        protected: for each kept version outside the newest ``keep``, why it stays (``LATEST``, a lease).
    """

    deleted: list[int]
    kept: list[int]
    protected: dict[int, list[str]] = field(default_factory=dict)


def prune(registry_dir: Path | str, model: str, *, keep: int = DEFAULT_KEEP, now: float | None = None,
          dry_run: bool = False) -> PruneResult:
    """Delete all but the newest ``keep`` versions, never the ``LATEST`` one nor one a live lease names.

    A version disappears atomically (renamed to a hidden temporary, then removed), so a reader sees it
    whole or not at all. Expired lease files long past their expiry are removed as well.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    t = time.time() if now is None else now
    versions = registry.list_versions(registry_dir, model)
    latest = registry.latest_version(registry_dir, model)
    reasons: dict[int, list[str]] = {}
    if latest is not None:
        reasons.setdefault(latest, []).append("LATEST")
    leases = read_leases(registry_dir, model)
    for lease in leases:
        if lease.live(t):
            for v in sorted(lease.versions):
                reasons.setdefault(v, []).append(f"served by {lease.server_id}")
    newest = set(versions[-keep:])
    doomed = [v for v in versions if v not in newest and v not in reasons]
    kept = [v for v in versions if v not in doomed]
    protected = {v: reasons[v] for v in kept if v not in newest}
    if dry_run:
        return PruneResult(deleted=doomed, kept=kept, protected=protected)
    model_dir = Path(registry_dir) / model
    for v in doomed:
        grave = model_dir / f"{_PRUNE_PREFIX}{v}-{uuid.uuid4().hex[:8]}"
        os.rename(model_dir / str(v), grave)
        shutil.rmtree(grave)
    if doomed:
        fd = os.open(model_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for lease in leases:
        if lease.expires_at + _LEASE_GC_GRACE_S < t:
            (_lease_dir(registry_dir, model) / f"{lease.server_id}.json").unlink(missing_ok=True)
    return PruneResult(deleted=doomed, kept=kept, protected=protected)


# -- verification -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyResult:
    """One version's verdict: ``ok``, or what failed (``code``: a ``VerificationError`` code) and why."""

    version: int
    ok: bool
    detail: str
    code: str | None = None


def check_deep(registry_dir: Path | str, model: str, version: int) -> tuple[VersionInfo, dict[str, bytes], Any]:
    """Every hash of ``version``, then ``daemon.registry.trust.check_version``; raises ``VerificationError``."""
    from daemon.registry import trust

    manifest = registry.read_manifest(registry_dir, model, version)
    wanted = [n for n in (registry.TORCHSCRIPT_FILE, registry.EXPORT_FILE, registry.STATE_DICT_FILE)
              if n in manifest["files"]]
    info, files = registry.read_verified(registry_dir, model, version, read=wanted)
    return info, files, trust.check_version(info, files, registry_dir=registry_dir)


def verify_all(registry_dir: Path | str, model: str, versions: Iterable[int] | None = None) -> list[VerifyResult]:
    """Check every (or the given) version as a server would before serving it; one result each, never raising.

    Every hash, then ``daemon.registry.trust.check_version``: nothing resolving outside the registry, finite
    weights, and ``model.pt`` / ``model.pt2`` loading and computing what ``model.safetensors`` rebuilt from
    the manifest computes on the probe inputs.
    """
    out: list[VerifyResult] = []
    for v in (registry.list_versions(registry_dir, model) if versions is None else versions):
        try:
            info, files, checked = check_deep(registry_dir, model, v)
        except registry.VerificationError as exc:
            out.append(VerifyResult(v, False, str(exc), exc.code))
        except (RegistryError, OSError) as exc:
            out.append(VerifyResult(v, False, str(exc), "missing"))
        else:
            served = "model.pt2 + model.pt" if registry.EXPORT_FILE in files else "model.pt"
            out.append(VerifyResult(v, True, f"{len(info.manifest['files'])} files, sha256 {info.sha256}; {served} "
                                             f"agree with the weights (reference: {checked.reference_from})"))
    return out


def check_latest(registry_dir: Path | str, model: str) -> str | None:
    """Why ``LATEST`` is wrong, or ``None``: it must name the newest complete version (history only grows; a
    rollback is a new version), and a server lease must not name a newer one (``LATEST`` moved back)."""
    try:
        latest = registry.latest_version(registry_dir, model)
    except RegistryError as exc:
        return str(exc)
    versions = registry.list_versions(registry_dir, model)
    if latest is None:
        return "no LATEST" if versions else None
    if latest not in versions:
        return f"LATEST names version {latest}, which does not exist"
    served = [lease.version for lease in read_leases(registry_dir, model) if lease.version is not None]
    newest = max([*versions, *served])
    if latest < newest:
        return (f"LATEST names version {latest} but version {newest} exists or was served: it went backwards "
                f"(servers refuse it); publish a rollback as a new version: unlearnd registry rollback --to {latest}")
    return None


# -- rollback -----------------------------------------------------------------------------------------
def forgotten_request_ids(registry_dir: Path | str, model: str, version: int) -> tuple[set[str], bool]:
    """The request ids whose unlearning version ``version``'s weights carry, and whether that is complete.

    Follows the lineage: a round's version holds its own requests and its parent's; a rollback's version
    holds what its target held. ``complete`` is False when a manifest on the way was pruned.
    """
    seen: set[int] = set()
    ids: set[str] = set()
    current: int | None = version
    while current is not None and current not in seen:
        seen.add(current)
        try:
            manifest = registry.read_manifest(registry_dir, model, current)
        except RegistryError:
            return ids, False
        rb = manifest.get("rollback")
        if isinstance(rb, dict) and isinstance(rb.get("to"), int):
            current = rb["to"]
            continue
        ids.update(r for r in manifest.get("request_ids") or [] if isinstance(r, str))
        parent = manifest.get("parent")
        current = parent if isinstance(parent, int) else None
    return ids, True


def rollback(registry_dir: Path | str, model: str, to: int, *, reason: str | None = None) -> VersionInfo:
    """Serve version ``to`` again, as a new version whose parent is the current ``LATEST`` (or the newest
    version, if ``LATEST`` was moved back by hand: servers kept serving that one).

    Raises:
        ValueError: ``to`` is not a version of the model, or it is what ``LATEST`` already names.
        VerificationError: version ``to`` does not match its manifest, or fails ``daemon.registry.trust``'s
            checks (nothing is written).
    """
    versions = registry.list_versions(registry_dir, model)
    if to not in versions:
        raise ValueError(f"model {model!r} has no version {to} (versions: "
                         f"{', '.join(map(str, versions[-10:])) or 'none'})")
    # What servers serve: LATEST, or a newer version when LATEST was moved back by hand (servers refuse that).
    current = max([v for v in (registry.latest_version(registry_dir, model),) if v is not None] + versions[-1:])
    if current == to:
        raise ValueError(f"LATEST already names version {to} (the newest); nothing to roll back")
    check_deep(registry_dir, model, to)          # never propagate a version a server would refuse
    now_held, complete_now = (forgotten_request_ids(registry_dir, model, current) if current is not None
                              else (set(), True))
    then_held, complete_then = forgotten_request_ids(registry_dir, model, to)
    complete = complete_now and complete_then
    reverted = sorted(now_held - then_held)
    method = {"name": "rollback", "params": {"to": to, "from": current}}
    updates: dict[str, Any] = {
        "round_id": None,
        "request_ids": [],
        "method": method,
        "rollback": {"to": to, "from": current, "reason": reason, "reverted_request_ids": reverted,
                     "lineage_complete": complete},
    }
    return registry.copy_version(registry_dir, model, to, parent=current, manifest_updates=updates)
