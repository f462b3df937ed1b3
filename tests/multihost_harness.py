"""Two daemons as two "hosts" (issue 24): separate processes with their own state and local directories, sharing
only the PostgreSQL ledger, the registry directory (the shared-volume case), the key files and the broker.

Used by tests/test_multihost_takeover.py and benchmarks/multihost_takeover.py: start both, find which daemon owns
which model (from their ``ownership_taken`` events), produce requests, kill -9 an owner mid-round (a failpoint
that SIGKILLs the daemon at a named step of its round commit), and count what the receipts and the registry say.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import registry
from tests.pipeline_harness import (
    DaemonProcess,
    outcome_receipts,
    produce_requests,
    read_topic,
    request,
    write_config,
)

#: three models on three different partitions of the 4-partition requests topic (murmur2): 0, 2 and 3, so two
#: daemons in one group (range assignor: [0, 1] and [2, 3]) split them one and two
MODELS = ("mnist-b", "mnist-d", "mnist-e")


def shared_keys(root: Path) -> str:
    """The ``[keys]`` table both hosts use: one state key (to unseal each other's continual state) and one id
    key (a ledger keeps the id key it was first opened with), as a deployment mounts one secret on every host."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("state", "id"):
        path = root / f"{name}.key"
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
        paths[name] = path
    return f'\n[keys]\nstate_key_file = "{paths["state"]}"\nid_key_file = "{paths["id"]}"\n'


@dataclass
class Host:
    """One daemon "host": its process and its own directories."""

    name: str
    process: DaemonProcess
    state_dir: Path

    def owned(self) -> dict[str, int]:
        """The models this daemon took, with the epoch of its latest take."""
        out: dict[str, int] = {}
        for e in self.process.events():
            if e.get("event") == "ownership_taken":
                out[e["model"]] = int(e["epoch"])
        return out


@dataclass
class Cluster:
    root: Path
    bootstrap: str
    registry_dir: Path
    state_url: str
    models: Sequence[str] = MODELS
    hosts: list[Host] = field(default_factory=list)
    #: the bucket's settings (UNLEARND_REGISTRY_URL, ..._ENDPOINT_URL): each host then keeps its own working copy
    #: (``<root>/<host>/registry``, empty at start) instead of sharing ``registry_dir``
    bucket_env: Mapping[str, str] | None = None

    def start_host(self, name: str, *, failpoints: str = "", keys: str = "", rounds: str = "max_instances = 2"
                   ) -> Host:
        """A daemon on its own "host"; rounds of at most two instances by default, so a killed round leaves
        requests behind for the next owner."""
        state = self.root / name / "state"
        (self.root / name).mkdir(parents=True, exist_ok=True)
        registry_dir = self.registry_dir if self.bucket_env is None else self.root / name / "registry"
        cfg = write_config(self.root / name / "u.toml", bootstrap=self.bootstrap, registry_dir=registry_dir,
                           state_dir=state, models=self.models, instance=name, rounds=rounds,
                           kafka_extra="static_membership = false", extra=keys)
        env = {"UNLEARND_STATE_URL": self.state_url, **(self.bucket_env or {})}
        if failpoints:
            env["UNLEARND_FAILPOINTS"] = failpoints
        host = Host(name, DaemonProcess(cfg, self.root / name / "daemon.log", env=env).start(), state)
        self.hosts.append(host)
        return host

    def wait_split(self, timeout: float = 120.0) -> dict[str, Host]:
        """Wait until every model is owned by exactly one live host and every host owns one: the owner of each."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owners = self.owners()
            if set(owners) == set(self.models) and {h.name for h in owners.values()} == {h.name for h in self.hosts}:
                return owners
            for h in self.hosts:
                if h.process.proc is not None and h.process.proc.poll() is not None:
                    raise AssertionError(f"{h.name} exited:\n{h.process.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"the models were not split between the hosts: {self.owners()}")

    def owners(self) -> dict[str, Host]:
        """Each model's owner: the host holding its highest epoch."""
        best: dict[str, tuple[int, Host]] = {}
        for h in self.hosts:
            for model, epoch in h.owned().items():
                if model not in best or epoch > best[model][0]:
                    best[model] = (epoch, h)
        return {m: h for m, (_, h) in best.items()}

    def stop(self) -> None:
        for h in self.hosts:
            h.process.kill()


def bodies(counts: Mapping[str, int], *, prefix: str = "mh", first: int = 1000) -> list[dict[str, Any]]:
    """``counts[model]`` single-instance forget requests per model, each naming its own training item (from
    ``first`` on: a second batch must name other items, or its rounds re-forget what the memory already holds)."""
    return [request(f"{prefix}-{m}-{i}", "forget", [f"mnist-train:{first + 50 * j + i}"], model=m)
            for j, (m, n) in enumerate(sorted(counts.items())) for i in range(n)]


def send(bootstrap: str, items: Sequence[dict[str, Any]]) -> None:
    produce_requests(bootstrap, items)


def wait_outcomes(bootstrap: str, ids: Sequence[str], timeout: float) -> list[Any]:
    want = set(ids)
    return read_topic(bootstrap, "unlearn.receipts", timeout=timeout,
                      until=lambda rs: want <= set(outcome_receipts(rs)))


@dataclass(frozen=True)
class Tally:
    """What the receipts and the registry say of a set of requests."""

    requests: int
    applied: int            # requests with exactly one applied receipt and no other outcome
    duplicates: int         # requests applied more than once, in receipts or in published versions
    lost: int               # requests with no outcome receipt at all
    versions: dict[str, int]
    other: dict[str, list[str]]


def tally(records: Sequence[Any], ids: Sequence[str], registry_dir: Path, models: Iterable[str]) -> Tally:
    got = outcome_receipts(records)
    in_versions: dict[str, int] = {}
    versions: dict[str, int] = {}
    rounds_published: list[str] = []
    for m in models:
        vs = registry.list_versions(registry_dir, m)
        versions[m] = len(vs)
        for v in vs:
            manifest = registry.read_manifest(registry_dir, m, v)
            if manifest.get("round_id"):
                rounds_published.append(manifest["round_id"])
            for rid in manifest.get("request_ids") or []:
                in_versions[rid] = in_versions.get(rid, 0) + 1
    applied = duplicates = lost = 0
    other: dict[str, list[str]] = {}
    for rid in ids:
        statuses = [r["status"] for r in got.get(rid, [])]
        if not statuses:
            lost += 1
        elif statuses == ["applied"] and in_versions.get(rid, 0) == 1:
            applied += 1
        if statuses.count("applied") > 1 or in_versions.get(rid, 0) > 1:
            duplicates += 1
        if statuses and statuses != ["applied"]:
            other[rid] = statuses
    duplicates += len(rounds_published) - len(set(rounds_published))      # a round published as two versions
    return Tally(len(ids), applied, duplicates, lost, versions, other)
