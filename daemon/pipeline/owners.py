"""Which models this daemon owns, under which fencing epoch (issue 24, part 3): the daemon's side of
:mod:`daemon.pipeline.ownership`.

Requests are keyed by model name, so a model lives in one partition of the requests topic (Kafka's default
partitioner: murmur2 of the key). When the group assigns this daemon partitions, it takes each of their models
in the shared ledger (:meth:`Owners.on_assigned`), which raises the model's epoch: from then on a previous owner
(paused, cut off, slow to notice the revocation) can neither commit a round of it nor move its ``LATEST``. A
model this daemon already holds keeps its epoch when nobody took it in between, so an ordinary rebalance (a
daemon joining the group revokes and re-assigns every partition) does not refuse the rounds in flight.

A round runs under the epoch held when it started; a :class:`~daemon.pipeline.ownership.StaleOwner` refusal drops
the model (:meth:`Owners.drop`): no round of it runs here until a rebalance assigns its partition again.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from kafka.partitioner.default import murmur2

from daemon.pipeline.ledger import Ledger

__all__ = ["Owners", "partition_of"]

log = structlog.get_logger("unlearnd.daemon")


def partition_of(model: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (kafka-python's and the Java client's) gives a message keyed
    by ``model`` on a topic of ``partitions`` partitions."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, got {partitions}")
    return (murmur2(model.encode("utf-8")) & 0x7FFFFFFF) % partitions


class Owners:
    """The epochs this daemon holds, per model; read by the round thread (one dict lookup), written by the main
    thread (the rebalance callback and a round's stale outcome)."""

    def __init__(self, ledger: Ledger, instance: str, models: Iterable[str]) -> None:
        self.ledger = ledger
        self.instance = instance
        self.models = list(models)
        self.epochs: dict[str, int] = {}
        self.dropped: set[str] = set()

    def models_of(self, partitions: Iterable[int], count: int) -> list[str]:
        """The configured models whose requests land in these partitions (of ``count``)."""
        wanted = set(partitions)
        return [m for m in self.models if partition_of(m, count) in wanted]

    def epoch(self, model: str) -> int | None:
        """The epoch this daemon holds for ``model`` (None: never taken here, or dropped)."""
        return self.epochs.get(model)

    def on_assigned(self, partitions: Iterable[int], count: int) -> list[tuple[str, int]]:
        """Take every model of the assigned partitions that this daemon does not hold any more; returns the models
        taken over (with their new epochs): their previous owner's unfinished rounds must be resolved and the
        model reloaded from ``LATEST`` before their requests run here."""
        taken = [(model, self.take(model)) for model in self.models_of(partitions, count)]
        return [(model, epoch) for model, epoch in taken if epoch is not None]

    def take(self, model: str) -> int | None:
        """Take ``model`` unless this daemon still holds it (nobody took it in between): its new epoch, or None.

        Raises ``LedgerUnavailable`` when the ledger's database is away; the caller tries again later (the epoch
        held, if any, is kept: whether it is still the model's cannot be known until the ledger answers)."""
        held = self.epochs.get(model)
        if held is not None and model not in self.dropped and self.ledger.ownership_epoch(model) == held:
            return None                                     # still ours: nobody took it in between
        epoch = self.ledger.take_ownership(model, self.instance)
        self.epochs[model] = epoch
        self.dropped.discard(model)
        log.info("ownership_taken", model=model, epoch=epoch, previous=held)
        return epoch

    def drop(self, model: str) -> None:
        """A newer owner exists (a refused commit or publish): forget the epoch and run no round of the model here
        until its partition is assigned again."""
        self.epochs.pop(model, None)
        self.dropped.add(model)
