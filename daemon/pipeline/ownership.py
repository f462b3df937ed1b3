"""Ownership of a model across hosts (issue 24, part 3): an epoch per model in the shared ledger, the fencing token.

Daemons in one consumer group share the models by partition. Kafka's rebalance says who *should* own a model, but
a daemon that was paused, partitioned away or slow to notice a revocation may still be finishing a round; without
a token it could publish over the version its successor already published. So:

* a daemon that is assigned a model's partition **takes** it (:func:`take`): one serialised write transaction
  increments the model's epoch and records the taker; the daemon remembers the epoch it got;
* every round commit checks, inside the commit's own transaction, that the model's epoch is still the one the
  daemon holds (:func:`check`): a stale commit raises :class:`StaleOwner` and writes nothing;
* just before ``LATEST`` moves, :func:`check_publish` compares the token with the one recorded in the manifest that
  ``LATEST`` names now (``owner_epoch``) and with the ledger's: the registry on a shared volume and the registry on
  S3 call the same function, so the rule lives once.

The write transaction is the ledger's (``BEGIN IMMEDIATE`` on SQLite, the advisory write lock at READ COMMITTED on
PostgreSQL, :mod:`daemon.pipeline.ledger_sql`): two takers are serialised, each sees the other's epoch, and two
never get the same one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from daemon.pipeline.ledger_sql import Engine

__all__ = ["StaleOwner", "check", "check_publish", "current", "take"]

_TAKE = ("INSERT INTO ownership (model, epoch, owner, taken_at) VALUES (?, 1, ?, ?) "
         "ON CONFLICT (model) DO UPDATE SET epoch=ownership.epoch + 1, owner=excluded.owner, "
         "taken_at=excluded.taken_at")


class StaleOwner(RuntimeError):
    """A commit or publish under an epoch that is no longer the model's: another daemon took the model over.

    Not a failure of the round's requests: they stay accepted and the new owner applies them (Kafka re-delivers
    them from the committed offsets; the ledger's idempotency keeps them once)."""

    def __init__(self, model: str, held: int, current_epoch: int | None, where: str) -> None:
        self.model, self.held, self.current = model, held, current_epoch
        super().__init__(f"{model}: stale owner (epoch {held}, {where} has {current_epoch}): another daemon took "
                         f"the model over; this one drops it and leaves its requests to the new owner")


def take(db: Engine, model: str, owner: str) -> int:
    """Take ``model`` for ``owner`` (a daemon instance id): the epoch after the increment, the daemon's token."""
    with db.write():
        db.execute(_TAKE, (model, owner, time.time()))
        return int(db.execute("SELECT epoch FROM ownership WHERE model=?", (model,)).fetchone()[0])


def current(db: Engine, model: str) -> int | None:
    """The model's epoch now (None: never taken; a single daemon on one host never takes one)."""
    row = db.execute("SELECT epoch FROM ownership WHERE model=?", (model,)).fetchone()
    return None if row is None else int(row[0])


def check(db: Engine, model: str, epoch: int | None) -> None:
    """Call inside a write transaction (the round's commit): :class:`StaleOwner` unless ``epoch`` is the model's.

    ``epoch`` None means the daemon runs without ownership (one host): accepted only while no daemon took the
    model, so a daemon without a token cannot publish over one that has one either."""
    now = current(db, model)
    if now != epoch:
        raise StaleOwner(model, epoch if epoch is not None else 0, now, "the ledger")


def check_publish(model: str, epoch: int | None, latest_manifest: Mapping[str, Any] | None,
                  ledger_epoch: int | None) -> None:
    """The registry-side check, just before ``LATEST`` moves (shared volume or S3 alike).

    Refuses when the manifest ``LATEST`` names carries a higher ``owner_epoch`` than ours (a newer owner already
    published) or when the ledger's epoch moved on since our commit (a newer owner took the model between our
    commit and our publish). A manifest without ``owner_epoch`` (written before issue 24) counts as epoch 0."""
    held = epoch or 0
    published = int((latest_manifest or {}).get("owner_epoch") or 0)
    if published > held:
        raise StaleOwner(model, held, published, "the registry's LATEST manifest")
    if ledger_epoch != epoch:
        raise StaleOwner(model, held, ledger_epoch, "the ledger")
