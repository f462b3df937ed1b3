"""What the daemon does when the group moves partitions (kafka-python's rebalance callbacks, called inside a poll).

kafka-python 3 revokes every partition on a rebalance and then assigns the new set, but it *keeps the fetch
position* of a partition that is assigned again: its records are not read a second time. So the requests waiting
for a partition are dropped only once it is known to be gone (:meth:`Rebalance.assigned`), not at the revocation.

Issue 24: the models of the assigned partitions are taken in the ledger (a fencing epoch each,
:class:`~daemon.pipeline.owners.Owners`). A model another daemon took in between is taken back with a new epoch: the
rounds it left unfinished are resolved (:meth:`~daemon.pipeline.commit.RoundCommitter.take_over`), ``LATEST`` is
loaded, and a partition this daemon kept reading is rewound to the group's committed offset, so that what the other
daemon decided meanwhile is read again from the ledger instead of from this daemon's memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import structlog
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError

from daemon.pipeline.batcher import Batcher
from daemon.pipeline.commit import RoundCommitter
from daemon.pipeline.config import Config
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

__all__ = ["Rebalance", "drop_model"]

log = structlog.get_logger("unlearnd.daemon")


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
        rounds, load ``LATEST``, and rewind a kept partition whose model another daemon owned in between."""
        d = self.daemon
        gone, kept = self.pending_revoked - assigned, self.pending_revoked & assigned
        self.pending_revoked = set()
        d.batcher.drop(gone)
        d.offsets.forget(gone)
        topic = d.config.kafka.requests_topic
        count = (len(d.consumer.partitions_for_topic(topic) or ()) if d.consumer is not None else 0) \
            or d.config.kafka.partitions
        busy = {d.batcher.running[0].model} if d._round is not None and d.batcher.running else set()
        if d._rebase is not None and d._rebase.finish is not None:
            busy.add(d._rebase.model)
        parts = [tp.partition for tp in assigned if tp.topic == topic]
        for model, epoch in d.owners.on_assigned(parts, count):
            if not d._rebasing(model):
                d.batcher.held.discard(model)
            idle = model not in busy            # never reload under a round (or a rebase's finish) of the model
            try:
                n = d.committer.take_over(model, d.instance, d.runtimes[model], epoch, reload=idle)
            except StaleOwner as exc:
                drop_model(d, model, str(exc))
                continue
            log.info("model_taken_over", model=model, epoch=epoch, rounds_resolved=n)
            if idle:
                d._export_loaded(model)
            # a kept partition of a model taken (back): another daemon owned it in between, or this one dropped
            # it; read again from the group's offset, so the ledger, not this daemon's memory, decides each request
            for tp in kept:
                if tp.topic == topic and tp.partition == partition_of(model, count):
                    self.rewind(tp)

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
