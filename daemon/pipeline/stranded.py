"""Accepted requests nobody can finish any more: found, counted while they wait, then failed with a receipt.

An accepted request lives in two places: its ledger row (``accepted``) and its message in Kafka, which holds
its inputs (the ledger keeps hashes only). Its offset is never committed before its round decided it, so a
daemon that dies mid-round gets it back: the broker redelivers it and the intake takes it in again. That
fails only when the broker lost the message too (the in-memory broker restarted, the topic was recreated,
retention deleted it): then the ledger row would wait forever, and a resubmission of its id would be called a
``duplicate`` of a pending request. This module closes that gap.

An *orphan* is an accepted request this daemon does not hold in memory (not waiting in the batcher, not in
the running round). It is counted in ``unlearnd_pending_requests`` and the deletion clock while it is on a
partition this daemon owns. It is *stranded* when there is evidence that the broker can no longer redeliver it:

* ``overwritten``: its delivery row was replaced by another message at the same offset (a log restarted at 0);
* ``passed``: this daemon read its partition past its offset since it was assigned, and did not take it in
  again (what it read there was another message);
* ``log_ends``: the partition has been quiet (polls empty, not paused) while the consumer's position is at or
  before its offset: the log ends before it;
* ``partition_gone``: the topic no longer has its partition.

Once the evidence has held for ``daemon.stranded_after_s`` the request gets a ``failed`` receipt (reason
``stranded: …, resubmit it``) and the ledger status ``stranded``, in one transaction that first checks it is
still ``accepted`` (so two daemons sharing a ledger never both answer it). A resubmission is then accepted
anew. Nothing is applied twice: a stranded request was never in a committed round (its ledger status would be
``applied``), and the message it came in is gone, so only the resubmission can run.

Why a receipt and not a re-run: the daemon would have to keep each request's inputs (encrypted) until its
round commits to re-run it by itself; the failed receipt keeps the ledger free of raw data (contract §3) and
costs the publisher one resend, which its own systems (the data owner's) can always do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog
from kafka import TopicPartition

from daemon.pipeline.ledger import Ledger
from daemon.pipeline.receipts import ReceiptChain, StrandedReceipt

__all__ = ["Orphan", "PartitionView", "StrandedWatch"]

log = structlog.get_logger("unlearnd.daemon")


@dataclass
class Orphan:
    """An accepted request this daemon does not hold, where its message was, and since when it is stranded."""

    request_id: str
    model: str | None
    kind: str | None
    received_at: float
    where: tuple[str, int, int, str] | None       # topic, partition, offset, fingerprint (None: overwritten)
    evidence: str | None = None
    evidence_since: float | None = None            # monotonic


@dataclass(frozen=True)
class PartitionView:
    """What the daemon's consumer knows of the requests topic now (read by the main thread, which owns it)."""

    assigned: frozenset[TopicPartition]
    next_offset: Mapping[TopicPartition, int]      # read this assignment (OffsetBook.next_offset)
    quiet: bool                                    # the last polls came back empty, nothing paused, long enough
    position: Callable[[TopicPartition], int | None]
    partitions: Callable[[str], set[int] | None]   # the topic's partitions (None: unknown)


class StrandedWatch:
    """Finds orphans, exports them to the pending gauges, and fails the stranded ones (see the module doc)."""

    def __init__(self, ledger: Ledger, receipts: ReceiptChain, *, after_s: float,
                 versions: Callable[[str], int | None]) -> None:
        self.ledger = ledger
        self.receipts = receipts
        self.after_s = after_s
        self.versions = versions        # a model's live version, for the receipt
        self.orphans: dict[str, Orphan] = {}

    def counted(self, assigned: Iterable[TopicPartition]) -> list[Orphan]:
        """The orphans the pending gauges count here: on a partition this daemon owns, or stranded anyhow."""
        owned = {(tp.topic, tp.partition) for tp in assigned}
        return [o for o in self.orphans.values() if o.where is None or o.where[:2] in owned or o.evidence]

    def step(self, waiting: set[str], view: PartitionView) -> list[StrandedReceipt]:
        """Refresh the orphans, weigh the evidence, fail those stranded long enough; returns their receipts."""
        accepted = {r["request_id"]: r for r in self.ledger.accepted_requests() if r["request_id"] not in waiting}
        for rid in list(self.orphans):
            if rid not in accepted:
                del self.orphans[rid]                   # taken in again, or decided
        new = [rid for rid in accepted if rid not in self.orphans]
        if new:
            found = self.ledger.accepted_deliveries(new)
            for rid in new:
                r = accepted[rid]
                self.orphans[rid] = Orphan(rid, r["model"], r["kind"], r["received_at"], found.get(rid))
        now = time.monotonic()
        due: list[Orphan] = []
        for o in self.orphans.values():
            evidence = self._evidence(o, view)
            if evidence is None:
                o.evidence, o.evidence_since = None, None
                continue
            if o.evidence_since is None:
                log.warning("request_orphaned", request_id=o.request_id, evidence=evidence,
                            fails_in_s=self.after_s)
                o.evidence_since = now
            o.evidence = evidence
            if now - o.evidence_since >= self.after_s:
                due.append(o)
        return self._fail(due) if due else []

    def _evidence(self, o: Orphan, view: PartitionView) -> str | None:
        if o.where is None:
            return "overwritten: another message now holds its offset"
        topic, partition, offset, fp = o.where
        seen = self.ledger.delivery(topic, partition, offset)
        if seen is None or seen.fingerprint != fp or seen.request_id != o.request_id:
            o.where = None
            return "overwritten: another message now holds its offset"
        parts = view.partitions(topic)
        if parts is not None and parts and partition not in parts:
            return f"partition_gone: {topic} has no partition {partition} any more"
        tp = TopicPartition(topic, partition)
        if tp not in view.assigned:
            return None                                 # another daemon's, or not assigned yet
        if view.next_offset.get(tp, 0) > offset:
            return f"passed: partition {partition} was read past offset {offset} without it"
        if view.quiet:
            position = view.position(tp)
            if position is not None and position <= offset:
                return f"log_ends: partition {partition} holds nothing at offset {offset} (its log ends at {position})"
        return None

    def _fail(self, due: list[Orphan]) -> list[StrandedReceipt]:
        out: list[StrandedReceipt] = []
        now = time.time()
        with self.ledger.transaction() as tx:
            tx.load((), [o.request_id for o in due])
            for o in due:
                row = tx.request(o.request_id)
                if row is None or row["status"] != "accepted":
                    continue                            # decided meanwhile (another daemon sharing the ledger)
                receipt = StrandedReceipt(
                    request_id=o.request_id, model=o.model, kind=o.kind,
                    round_id=self.ledger.last_round_of(o.request_id), evidence=o.evidence or "",
                    current_version=self.versions(o.model) if o.model else None,
                    received_at=o.received_at, failed_at=now)
                tx.finish(o.request_id, "stranded", model=o.model, kind=o.kind,
                          reason=f"{StrandedReceipt.REASON}: {o.evidence}", round_id=receipt.round_id)
                self.receipts.append(tx, receipt)
                out.append(receipt)
        for r in out:
            self.orphans.pop(r.request_id, None)
            log.warning("request_stranded", request_id=r.request_id, model=r.model, round_id=r.round_id,
                        evidence=r.evidence, detail="failed receipt sent: the publisher must resubmit it")
        return out
