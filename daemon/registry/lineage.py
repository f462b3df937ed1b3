"""How many instances a version has forgotten since its lineage's *base*: the newest version its weights
descend from that was made from data rather than from unlearning.

Why it is counted at all: continual unlearning wears the model down as deletions accumulate (MNIST CNN,
rounds of 32: 2 points of test loss by 320 deletions, 7 by 512), and the continual memory fills, until a
retrain without the forgotten data starts a new lineage. Operators need the count to see that coming
(``unlearnd_deletions_since_base``, docs/operations.md).

A base is a version whose manifest's ``method.name`` is ``pretrain`` (trained by unlearnd), ``import`` (trained
elsewhere, ``unlearnd import``) or ``rebase`` (retrained without the forgotten data), or any first version
(no parent). Everything else (rounds of the daemon or of ``unlearnd unlearn``, rollbacks) descends from one.

Where the count lives: every version written through ``model_store.publish`` records it in its manifest
(``deletions_since_base``: its parent's count plus the instances of its own round, 0 for a base), so reading
it costs one manifest that is already loaded, and it is right after a restart, after a rollback (a rollback
copies its target's manifest, count included: the weights are the target's) and in a cluster (the manifest
is shared, a daemon's ledger is not). Pruning never removes ``LATEST``, so the count survives it too.
Versions written before the count existed lack it: :func:`deletions_since_base` then walks the lineage back
(once, at load) and counts their request ids' instances where the caller can tell them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.registry.layout import RegistryError
from daemon.registry.manifest import read_manifest

__all__ = ["BASE_METHODS", "DELETIONS_KEY", "Lineage", "deletions_since_base", "is_base", "recorded_deletions"]

BASE_METHODS = frozenset({"pretrain", "import", "rebase"})
DELETIONS_KEY = "deletions_since_base"


@dataclass(frozen=True)
class Lineage:
    """A version's deletions since its base; ``exact`` is False when the count is a lower bound (a manifest on
    the way was pruned, or a pre-count version's request ids could not be told in instances)."""

    deletions: int
    exact: bool = True


def is_base(manifest: Mapping[str, Any]) -> bool:
    """Whether a version starts a lineage: made from data (pretrain, import, rebase), or with no parent."""
    method = manifest.get("method")
    name = method.get("name") if isinstance(method, Mapping) else None
    if name in BASE_METHODS:
        return True
    return manifest.get("parent") is None and not isinstance(manifest.get("rollback"), Mapping)


def recorded_deletions(manifest: Mapping[str, Any]) -> int | None:
    """The count a manifest records (0 for a base), or None for a version written before the count existed."""
    if is_base(manifest):
        return 0
    value = manifest.get(DELETIONS_KEY)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def deletions_since_base(registry_dir: Path | str, model: str, version: int, *,
                         instances_of: Callable[[Sequence[str]], int | None] | None = None) -> Lineage:
    """The instances ``version`` has forgotten since its base, read from the manifests.

    Stops at the first manifest that records its count (normally ``version``'s own: one read). Older versions
    are walked back through ``parent`` (a rollback through its target, whose weights it holds);
    ``instances_of(request_ids)`` turns such a version's request ids into instances (the daemon asks its
    ledger), and where it cannot (None), each request counts as one and the result is not exact.
    """
    total, exact = 0, True
    seen: set[int] = set()
    current: int | None = version
    while current is not None and current not in seen:
        seen.add(current)
        try:
            manifest = read_manifest(registry_dir, model, current)
        except RegistryError:
            return Lineage(total, False)             # pruned: what was counted is a lower bound
        recorded = recorded_deletions(manifest)
        if recorded is not None:
            return Lineage(total + recorded, exact)
        rollback = manifest.get("rollback")
        if isinstance(rollback, Mapping) and isinstance(rollback.get("to"), int):
            current = rollback["to"]
            continue
        ids = [r for r in manifest.get("request_ids") or [] if isinstance(r, str)]
        counted = instances_of(ids) if instances_of is not None and ids else None
        if counted is None:
            counted, exact = len(ids), False
        total += counted
        parent = manifest.get("parent")
        current = parent if isinstance(parent, int) else None
    return Lineage(total, exact)
