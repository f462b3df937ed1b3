"""A rebase's training set: the training source minus every instance the ledger says was forgotten.

Membership is decided by content hash (:mod:`daemon.data.content`) against the ledger's ``forgotten_content``
rows up to the rebase's snapshot, never by ids or refs: a digit that was sent inline as a PNG is found in the
source as surely as one named by ``ref``. The rules, one per kind of request:

- ``forget``: the item is left out;
- ``forget_class``: the request's items are left out, and so is every item whose source label is a class the
  model forgot (the class must not come back when the model is trained again);
- ``relabel``: the item stays, trained with its last ``target`` (what the request asked the model to answer),
  unless a ``forget`` also names it (then it is left out). A relabelled instance that is not an item of the
  source cannot be trained with its target: the rebase refuses to run (:mod:`daemon.pipeline.rebase`).

Hashing the source is the cost (MNIST's 60,000 training digits: under a second); the hash of every item of
the slice is kept (``by_hash``) because the re-application after training reads instances back by hash.

The hashes are keyed with the daemon's id key (:mod:`daemon.keys`, issue 23), as the commit wrote them; rows
written before keyed hashes hold plain SHA-256 digests, so when the snapshot has any, the source is hashed
both ways (each item is then found under either digest). A row keyed under another id key cannot be matched:
the rebase refuses to run rather than leave a forgotten instance in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from daemon import keys
from daemon.data.content import source_hashes
from daemon.data.sources import Source
from daemon.pipeline.ledger import ForgottenContent

__all__ = ["ForeignKeyError", "TrainingSet", "build_training_set", "snapshot_digest"]


class ForeignKeyError(ValueError):
    """Forgotten instances were hashed under an id key other than the configured one: they cannot be found."""


@dataclass(frozen=True)
class TrainingSet:
    """What a rebase trains on, and what it found of the forgotten instances in its source."""

    source: str                     # the setting: name or name:start-end
    indices: list[int]              # source items trained on, in source order
    labels: torch.Tensor            # their labels (a relabel's target where one applies)
    by_hash: dict[str, int]         # content hash -> source index, for every item of the slice
    excluded: int                   # items of the slice left out
    relabeled: int                  # items trained with a relabel target
    forgotten: int                  # forgotten instances in the snapshot (found in the source or not)
    digest: str                     # snapshot_digest of them

    kept: frozenset[int]            # set(indices), for membership

    def status_of(self, row: ForgottenContent) -> str:
        """What the rebase did with a forgotten instance: ``excluded`` (an item it left out), ``relabeled``
        (trained with the target), or ``not_in_source`` (not an item of the training source: never seen)."""
        index = self.by_hash.get(row.content_sha256)
        if index is None:
            return "not_in_source"
        return "relabeled" if row.kind == "relabel" and index in self.kept else "excluded"


def snapshot_digest(rows: Iterable[ForgottenContent]) -> str:
    """SHA-256 over the sorted distinct content hashes: what a rebase's snapshot left out, checkable later."""
    h = hashlib.sha256()
    for c in sorted({r.content_sha256 for r in rows}):
        h.update(c.encode("ascii"))
    return h.hexdigest()


def _check_keys(forgotten: Sequence[ForgottenContent], key: keys.SecretKey | None) -> bool:
    """True when some rows hold plain digests; :class:`ForeignKeyError` when some were keyed by another key."""
    ids = {keys.digest_key_id(r.content_sha256)[0] for r in forgotten}
    foreign = sorted(k for k in ids if k is not None and (key is None or k != key.key_id))
    if foreign:
        have = key.key_id if key is not None else "none"
        raise ForeignKeyError(f"{sum(1 for r in forgotten if keys.digest_key_id(r.content_sha256)[0] in foreign)} "
                              f"forgotten instances were hashed under id key {', '.join(foreign)}, the configured "
                              f"id key is {have} (keys.id_key_file): restore that key, or no rebase can exclude them")
    return None in ids


def build_training_set(source: Source, spec: str, rows: Sequence[int] | range, shape: tuple[int, int, int],
                       forgotten: Sequence[ForgottenContent], forgotten_classes: Iterable[int] = (),
                       key: keys.SecretKey | None = None) -> TrainingSet:
    """The items of ``rows`` (indices into ``source``) left after the forgotten instances (see the module rules).

    ``forgotten`` are the ledger's rows up to the snapshot, in commit order; ``forgotten_classes`` the classes
    the model's version records (``forget_class`` rows add theirs); ``key`` the id key the rows' digests were
    made with (plain digests, from before keyed hashes, are matched too).
    """
    plain_too = _check_keys(forgotten, key)
    forget: set[str] = set()
    targets: dict[str, tuple[int, int]] = {}        # digest -> (commit order, target)
    classes = set(forgotten_classes)
    for order, r in enumerate(forgotten):
        if r.kind == "relabel" and r.target is not None:
            targets[r.content_sha256] = (order, int(r.target))     # commit order: the last target wins
        else:
            forget.add(r.content_sha256)
            if r.kind == "forget_class" and r.forget_class is not None:
                classes.add(int(r.forget_class))
    labels = source.labels
    by_hash: dict[str, int] = {}
    keep: list[int] = []
    keep_labels: list[int] = []
    relabeled = 0
    class_tensor = torch.tensor(sorted(classes), dtype=labels.dtype)
    gone_by_class = torch.isin(labels, class_tensor) if classes else None
    for index, contents in source_hashes(source, rows, shape, key, plain_too=plain_too and key is not None):
        for content in contents:
            by_hash.setdefault(content, index)
        if any(c in forget for c in contents) or (gone_by_class is not None and bool(gone_by_class[index])):
            continue
        keep.append(index)
        relabels = [targets[c] for c in contents if c in targets]
        if relabels:
            keep_labels.append(max(relabels)[1])
            relabeled += 1
        else:
            keep_labels.append(int(labels[index]))
    return TrainingSet(source=spec, indices=keep, labels=torch.tensor(keep_labels, dtype=torch.int64),
                       by_hash=by_hash, excluded=len(rows) - len(keep), relabeled=relabeled,
                       forgotten=len({r.content_sha256 for r in forgotten}), digest=snapshot_digest(forgotten),
                       kept=frozenset(keep))
