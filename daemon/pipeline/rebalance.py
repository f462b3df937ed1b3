"""What the daemon does when the group moves partitions (kafka-python's rebalance callbacks, called inside a poll).

kafka-python 3 revokes every partition on a rebalance and then assigns the new set, but it *keeps the fetch
position* of a partition that is assigned again: its records are not read a second time. So the requests waiting
for a partition are dropped only once it is known to be gone (:meth:`Rebalance.assigned`), not at the revocation.

Issue 24: the models of the assigned partitions are taken in the ledger (a fencing epoch each,
:class:`~daemon.pipeline.owners.Owners`). A model another daemon took in between is taken back with a new epoch: the
rounds it left unfinished are resolved (:meth:`~daemon.pipeline.commit.RoundCommitter.take_over`), ``LATEST`` is
loaded, and a partition this daemon kept reading is rewound to the group's committed offset, so that what the other
daemon decided meanwhile is read again from the ledger instead of from this daemon's memory.

A takeover that finds the ledger's database away (:class:`~daemon.pipeline.ledger.LedgerUnavailable`: a PostgreSQL
restart or failover during the rebalance) is *deferred*, not given up: the model is held in the batcher (no round of
it runs, its requests wait in the ledger and in Kafka) and :meth:`Rebalance.retry_deferred`, called from the main
loop, tries again with the intake's backoff (0.5 s doubling to 5 s) until it succeeds or the partition is revoked.
A resumed takeover rewinds the model's partition: requests read while it waited are decided again by the ledger,
after the previous owner's rounds were resolved (one rolled forward already applied some of them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError

from daemon.pipeline.batcher import Batcher
from daemon.pipeline.commit import RoundCommitter
from daemon.pipeline.config import Config
from daemon.pipeline.ledger import LedgerUnavailable
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.offsets import OffsetBook
from daemon.pipeline.owners import Owners, partition_of
from daemon.pipeline.ownership import StaleOwner
from daemon.pipeline.runtime import ModelRuntime


class Daemon(Protocol):
    """What a rebalance touches of :class:`daemon.pipeline.lifecycle.Daemon` (named here, so the two modules do not
    import each other): its parts, whether a round or a rebase's finish holds a model, and two of its steps."""

    config: Config
    consumer: Any
    batcher: Batcher
    offsets: OffsetBook
    owners: Owners
    committer: RoundCommitter
    instance: str
    runtimes: Mapping[str, ModelRuntime]
    metrics: DaemonMetrics
    _round: Any
    _rebase: Any

    def _rebasing(self, model: str) -> bool: ...

    def _commit_offsets(self, *, due_only: bool = False) -> None: ...

    def _export_loaded(self, model: str) -> None: ...

__all__ = ["TAKEOVER_BACKOFF_S", "Rebalance", "drop_model"]

log = structlog.get_logger("unlearnd.daemon")

TAKEOVER_BACKOFF_S = (0.5, 5.0)     # first and longest wait before a deferred takeover is tried again (the intake's)


@dataclass
class _Deferred:
    """A model whose takeover found the ledger away: ``epoch`` is None until the ledger gave it one (then only the
    previous owner's rounds remain to resolve); ``since``: monotonic, when it was first deferred."""

    epoch: int | None
    since: float


def drop_model(daemon: Daemon, model: str, detail: str) -> None:
    """Another daemon owns ``model``: count the refusal, and run no round of it until it is assigned here again."""
    daemon.owners.drop(model)
    daemon.batcher.held.add(model)
    daemon.metrics.stale_owner.labels(model=model).inc()
    log.warning("model_dropped_stale_owner", model=model, detail=detail)


class Rebalance(ConsumerRebalanceListener):
    """The daemon's rebalance listener; a raise inside a callback would turn into a failed poll, so none escapes."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.pending_revoked: set[TopicPartition] = set()
        self.deferred: dict[str, _Deferred] = {}        # models whose takeover waits for the ledger
        self._attempt = 0                               # consecutive tries that found the ledger away
        self._next_try = 0.0                            # monotonic: when the deferred takeovers are tried again

    def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            self.revoked(set(revoked))
        except Exception as exc:  # noqa: BLE001 - the group may already be gone (broker restart)
            log.warning("revoke_handling_failed", error=f"{type(exc).__name__}: {exc}")

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))
        try:
            self.assigned(set(assigned))
        except Exception as exc:  # noqa: BLE001
            log.warning("assign_handling_failed", error=f"{type(exc).__name__}: {exc}")

    def revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit what is safe; what waits for these partitions is dropped at the assignment if they are gone."""
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))
        try:
            self.daemon._commit_offsets()
        except Exception as exc:  # noqa: BLE001 - the group may already be gone (broker restart)
            log.warning("offset_commit_failed", error=f"{type(exc).__name__}: {exc}")
        self.pending_revoked |= revoked

    def assigned(self, assigned: set[TopicPartition]) -> None:
        """Drop the partitions gone; take the new partitions' models, resolve their previous owners' unfinished
        rounds, load ``LATEST``, and rewind a kept partition whose model another daemon owned in between. A model
        whose takeover finds the ledger away is deferred (:meth:`retry_deferred`); another error is raised."""
        d = self.daemon
        gone, kept = self.pending_revoked - assigned, self.pending_revoked & assigned
        self.pending_revoked = set()
        d.batcher.drop(gone)
        d.offsets.forget(gone)
        topic = d.config.kafka.requests_topic
        count = self._count()
        before, self.deferred = self.deferred, {}
        for model in before:                    # every model assigned now is tried anew below; the others are gone
            self._release(model)
        kept_parts = {tp.partition for tp in kept if tp.topic == topic}
        try:
            for model in d.owners.models_of([tp.partition for tp in assigned if tp.topic == topic], count):
                waiting = before.get(model)
                self._take(model, waiting, rewind=partition_of(model, count) in kept_parts or waiting is not None)
        finally:
            self._backoff()

    def retry_deferred(self) -> None:
        """From the main loop: try the deferred takeovers again once their backoff is over, except while a
        rebalance is under way (revoked, not yet assigned) or for a model whose partition is not assigned here
        any more. An error other than the ledger's is logged and the model left as a failed assignment leaves it."""
        d = self.daemon
        if not self.deferred or self.pending_revoked or time.monotonic() < self._next_try:
            return
        topic, count = d.config.kafka.requests_topic, self._count()
        mine = {tp.partition for tp in d.consumer.assignment() if tp.topic == topic}
        for model, waiting in list(self.deferred.items()):
            del self.deferred[model]
            if partition_of(model, count) not in mine:
                self._release(model)
                continue
            try:
                self._take(model, waiting, rewind=True)
            except Exception as exc:  # noqa: BLE001 - as in on_partitions_assigned: never out of the main loop
                log.warning("assign_handling_failed", model=model, error=f"{type(exc).__name__}: {exc}")
        self._backoff()

    def _take(self, model: str, waiting: _Deferred | None, *, rewind: bool) -> None:
        """Take ``model`` (unless still held) and resolve its previous owner's rounds; deferred again if the ledger
        is away. ``waiting``: its earlier deferral (the epoch already taken, if any); ``rewind``: read its
        partition again from the group's offset once taken (a kept partition, or requests read while it waited)."""
        d = self.daemon
        epoch = waiting.epoch if waiting is not None else None
        try:
            # an epoch taken before the ledger went away is kept while still the model's (its previous owner's rounds
            # are then still to resolve); a new one is taken if another daemon took the model meanwhile
            epoch = d.owners.take(model) or epoch
            if epoch is None:                   # still ours: nothing to resolve, nothing to reload
                if waiting is not None:
                    self._release(model)
                    self._resumed(model, waiting, d.owners.epoch(model), 0)
                return
            if not d._rebasing(model):
                d.batcher.held.discard(model)
            idle = model not in self._busy()    # never reload under a round (or a rebase's finish) of the model
            n = d.committer.take_over(model, d.instance, d.runtimes[model], epoch, reload=idle)
        except LedgerUnavailable as exc:
            self._defer(model, _Deferred(epoch, waiting.since if waiting else time.monotonic()), exc)
            return
        except StaleOwner as exc:
            drop_model(d, model, str(exc))
            return
        log.info("model_taken_over", model=model, epoch=epoch, rounds_resolved=n)
        if waiting is not None:
            self._resumed(model, waiting, epoch, n)
        if idle:
            d._export_loaded(model)
        # a kept partition of a model taken (back): another daemon owned it in between, or this one dropped it; read
        # again from the group's offset, so the ledger, not this daemon's memory, decides each request
        if rewind:
            self.rewind(TopicPartition(d.config.kafka.requests_topic, partition_of(model, self._count())))

    def _defer(self, model: str, waiting: _Deferred, exc: LedgerUnavailable) -> None:
        """Hold the model (no round of it runs; its requests wait) and try its takeover again after the backoff."""
        d = self.daemon
        d.batcher.held.add(model)
        self.deferred[model] = waiting
        d.metrics.ledger_unavailable.inc()
        log.warning("takeover_deferred", model=model, error=str(exc), retry_s=self._wait(self._attempt + 1),
                    attempt=self._attempt + 1, epoch=waiting.epoch)

    def _backoff(self) -> None:
        """After a pass over the models: the next try's time if some were deferred (one step per pass), else reset."""
        if not self.deferred:
            self._attempt = 0
            return
        self._attempt += 1
        self._next_try = time.monotonic() + self._wait(self._attempt)

    @staticmethod
    def _wait(attempt: int) -> float:
        first, longest = TAKEOVER_BACKOFF_S
        return min(longest, first * 2 ** (attempt - 1))

    def _resumed(self, model: str, waiting: _Deferred, epoch: int | None, resolved: int) -> None:
        log.info("takeover_resumed", model=model, epoch=epoch, rounds_resolved=resolved,
                 waited_s=round(time.monotonic() - waiting.since, 1))

    def _release(self, model: str) -> None:
        """A deferred model no longer waits (taken, still ours, or its partition gone): its rounds may run again."""
        if not self.daemon._rebasing(model):
            self.daemon.batcher.held.discard(model)

    def _busy(self) -> set[str]:
        """The models a round or a rebase's finish holds now (never reloaded under them)."""
        d = self.daemon
        busy = {d.batcher.running[0].model} if d._round is not None and d.batcher.running else set()
        if d._rebase is not None and d._rebase.finish is not None:
            busy.add(d._rebase.model)
        return busy

    def _count(self) -> int:
        """The requests topic's partition count (as the broker says; the configured one before it answers)."""
        d = self.daemon
        topic = d.config.kafka.requests_topic
        return (len(d.consumer.partitions_for_topic(topic) or ()) if d.consumer is not None else 0) \
            or d.config.kafka.partitions

    def rewind(self, tp: TopicPartition) -> None:
        """Drop what waits for ``tp`` and read it again from the group's committed offset."""
        d = self.daemon
        d.batcher.drop([tp])
        d.offsets.forget([tp])
        try:
            committed = d.consumer.committed(tp, timeout_ms=5000)
            if committed is None:
                d.consumer.seek_to_beginning(tp)
            else:
                d.consumer.seek(tp, int(committed))
            log.info("partition_rewound", partition=tp.partition, offset=committed)
        except (KafkaError, AssertionError, ValueError) as exc:
            log.warning("partition_rewind_failed", partition=tp.partition, error=f"{type(exc).__name__}: {exc}")
