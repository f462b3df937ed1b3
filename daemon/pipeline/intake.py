"""Intake: one poll's messages decided in one ledger transaction (accepted, rejected, or duplicate).

The checks that need no ledger (and no pixels) run first, in :func:`check_request`; the ledger is then
read in bulk and every message's effect recorded with the receipts and DLQ copies it causes, all in
one transaction. A replay is recognised before any image is decoded (cheap: the intake must keep up
with floods); accepted requests get their labels (:func:`fill_labels`) and wait in the batcher, their
offsets held until their round decides them.

Nothing leaves the transaction before it commits: the batcher and the offset book learn of a poll's messages
only once the ledger holds their effects. A ledger lost midway (:class:`LedgerUnavailable`, a PostgreSQL
restart) then leaves the daemon exactly as before the poll, and the caller re-reads the same messages later.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
import torch
from kafka import TopicPartition

from daemon.engine.kinds import get_kind
from daemon.keys import SecretKey
from daemon.pipeline.batcher import Batcher
from daemon.pipeline.codec import (
    CheckedRequest,
    DecodedRequest,
    Limits,
    ModelSpec,
    Rejection,
    check_request,
    decode_inputs,
)
from daemon.pipeline.failpoints import failpoint
from daemon.pipeline.ledger import Ledger, LedgerTransaction
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.offsets import OffsetBook
from daemon.pipeline.pending import PendingRequest
from daemon.pipeline.receipts import (
    AlreadyForgottenReceipt,
    DuplicateReceipt,
    ReceiptChain,
    RejectedReceipt,
    instance_outcomes,
)

__all__ = ["Intake", "fill_labels", "fingerprint"]

log = structlog.get_logger("unlearnd.daemon")

Predict = Callable[[torch.Tensor], list[int]]
_Effect = tuple[str, str, str]      # (kind, receipt status or '', dlq reason or '')
_NOTHING: _Effect = ("", "", "")


def fingerprint(record: Any) -> str:
    """Tells a redelivery (same timestamp, key and value) from a new message at a reused offset."""
    h = hashlib.sha256()
    h.update(str(record.timestamp).encode())
    h.update(b"\0" + (record.key or b"") + b"\0" + (record.value or b""))
    return h.hexdigest()[:32]


def fill_labels(decoded: DecodedRequest, predict: Predict) -> tuple[list[int], list[int] | None]:
    """The labels a round uses (the request's, else what the kind puts in their place) and the targets.

    The kind decides how a missing label is filled (``forget_class``: the class; the others: the published
    model's prediction, asked only for the instances without one). Raises :class:`Rejection` when a target
    equals the label that stands in for a missing one.
    """
    kind = get_kind(decoded.kind)
    labels = kind.fill_labels([inst.label for inst in decoded.instances], decoded.forget_class,
                              lambda missing: predict(torch.stack([decoded.instances[i].x for i in missing])))
    targets = None
    if kind.names_targets:
        targets = [inst.target for inst in decoded.instances]
        for i, (lab, tgt) in enumerate(zip(labels, targets, strict=True)):
            if lab == tgt:
                raise Rejection("target_equals_label",
                                f"instances[{i}].target equals the model's current prediction, which stands "
                                f"in for the missing label", decoded.request_id, decoded.model, decoded.kind)
    return labels, targets


class Intake:
    """Decides the messages of each poll; accepted requests go to the batcher, their offsets held in the book."""

    def __init__(self, ledger: Ledger, *, specs: Mapping[str, ModelSpec], predictors: Mapping[str, Predict],
                 limits: Limits, batcher: Batcher, offsets: OffsetBook, receipts: ReceiptChain, dlq_topic: str,
                 metrics: DaemonMetrics, log_each: bool = False,
                 versions: Callable[[str], int | None] = lambda _model: None, id_key: SecretKey | None = None) -> None:
        self.ledger = ledger
        self.specs = specs
        self.predictors = predictors
        self.limits = limits
        self.batcher = batcher
        self.offsets = offsets
        self.receipts = receipts
        self.dlq_topic = dlq_topic
        self.metrics = metrics
        # one log line per rejected or duplicate message only at debug: a flood must not be rendered line by line
        self.log_each = log_each
        self.versions = versions        # a model's published version (named by an already_forgotten receipt)
        self.id_key = id_key            # instance ids are kept as HMACs under it (issue 23)

    def process(self, records: Sequence[Any]) -> bool:
        """Decide one poll's records (kafka-python ``ConsumerRecord``-like); True when receipts were queued."""
        self.metrics.intake.inc(len(records))
        # byte-identical messages of one poll (a replay flood) are checked once: check_request is a pure function
        # of the bytes
        checks: dict[tuple[bytes | None, bytes | None], CheckedRequest | Rejection] = {}
        outcomes = []
        for rec in records:
            k = (rec.key, rec.value)
            got = checks.get(k)
            if got is None:
                try:
                    got = check_request(rec.value, rec.key, self.specs, self.limits, id_key=self.id_key)
                except Rejection as rej:
                    got = rej
                checks[k] = got
            outcomes.append(got)
        accepted: list[PendingRequest] = []
        with self.ledger.transaction() as tx:
            tx.load([(rec.topic, rec.partition, rec.offset) for rec in records],
                    [c.request_id for c in checks.values() if c.request_id is not None])
            now = time.time()
            effects = Counter(self._handle(tx, rec, checked, now, accepted)
                              for rec, checked in zip(records, outcomes, strict=True))
        # committed: only now do the offsets and the batcher learn of the poll (see the module's docstring)
        for rec in records:
            self.offsets.read(TopicPartition(rec.topic, rec.partition), rec.offset)
        stamp = time.monotonic()
        for p in accepted:
            self.batcher.add(p, stamp)
            self.offsets.hold(TopicPartition(p.topic, p.partition), p.offset)
            log.info("request_accepted", request_id=p.request_id, model=p.model, kind=p.decoded.kind,
                     instances=len(p.decoded.instances))
        failpoint("after_reject_batch")
        return self._count(effects, len(records))

    def _count(self, effects: Counter[_Effect], messages: int) -> bool:
        by_status: Counter[str] = Counter()
        for (kind, status, reason), n in effects.items():
            if status:
                self.metrics.requests.labels(kind=kind, status=status).inc(n)
                by_status[status] += n
            if reason:
                self.metrics.dlq.labels(reason=reason).inc(n)
                by_status["dlq"] += n
        if by_status:       # one line per poll, not per message (those are at debug)
            log.info("intake_batch", messages=messages, **by_status)
        return any(status for _, status, _ in effects)

    def _handle(self, tx: LedgerTransaction, rec: Any, checked: CheckedRequest | Rejection, now: float,
                accepted: list[PendingRequest]) -> _Effect:
        """Record one message's effect; an accepted request is appended to ``accepted`` (batched after commit)."""
        fp = fingerprint(rec)
        seen = tx.delivery(rec.topic, rec.partition, rec.offset)
        redelivered = seen is not None and seen.fingerprint == fp
        if redelivered:
            if seen.effect != "accepted" or seen.request_status != "accepted":
                return _NOTHING                   # already decided before a restart: nothing to redo
            if self.batcher.is_waiting(seen.request_id) or any(p.request_id == seen.request_id for p in accepted):
                return _NOTHING
        if isinstance(checked, Rejection):
            return self._reject(tx, rec, fp, checked, now)
        existing = tx.request(checked.request_id)
        # a stranded request's failed receipt asked for this resubmission (daemon/pipeline/stranded.py): accepted anew
        resubmitted = existing is not None and existing["status"] == "stranded"
        if existing is not None and not redelivered and not resubmitted:
            self.receipts.append(tx, DuplicateReceipt.of(request_id=checked.request_id, model=checked.model,
                                                         kind=checked.kind, original=existing, received_at=now))
            tx.record_delivery(rec.topic, rec.partition, rec.offset, fp, checked.request_id, "duplicate")
            if self.log_each:
                log.debug("request_duplicate", request_id=checked.request_id, original_status=existing["status"])
            return checked.kind, "duplicate", ""
        try:
            decoded = decode_inputs(checked)
            if self._already_forgotten(tx, decoded, now):
                tx.record_delivery(rec.topic, rec.partition, rec.offset, fp, decoded.request_id, "accepted")
                return decoded.kind, "applied", ""
            labels, targets = fill_labels(decoded, self.predictors[decoded.model])
        except Rejection as rej:
            return self._reject(tx, rec, fp, rej, now)
        received_at = float(existing["received_at"]) if existing is not None else now
        tx.accept(decoded.request_id, decoded.model, decoded.kind, len(decoded.instances), now)
        tx.record_delivery(rec.topic, rec.partition, rec.offset, fp, decoded.request_id, "accepted")
        accepted.append(PendingRequest(decoded=decoded, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                                       received_at=received_at, labels=labels, targets=targets))
        return _NOTHING

    def _already_forgotten(self, tx: LedgerTransaction, decoded: DecodedRequest, now: float) -> bool:
        """A ``forget`` request for instances this model already forgot (same id hash, in the ledger).

        An instance without a label takes the label it was forgotten as (today's prediction is already another
        class: forgetting *that* would push the instance on, and fill the memory for nothing). When every instance
        was forgotten before and the published model predicts none of them as its label, the request is answered
        at once with an ``applied`` receipt, reason ``already_forgotten``, naming the earlier round: True.
        """
        if decoded.kind != "forget":
            return False
        before = self._forgotten_before(tx, decoded)
        if not before:
            return False
        for inst in decoded.instances:
            if inst.label is None and inst.id_sha256 in before:
                inst.label = before[inst.id_sha256][0]
        if any(i.id_sha256 not in before for i in decoded.instances):
            return False                        # a new instance among them: a round runs (with the labels above)
        preds = self.predictors[decoded.model](torch.stack([i.x for i in decoded.instances]))
        labels = [int(i.label) for i in decoded.instances if i.label is not None]
        if any(int(p) == lab for p, lab in zip(preds, labels, strict=True)):
            return False                        # no longer forgotten (a rollback, a rebase): forget it again
        _, round_id, version = max((before[i.id_sha256] for i in decoded.instances),
                                   key=lambda b: (b[2] or 0, b[1] or ""))
        receipt = AlreadyForgottenReceipt(
            request_id=decoded.request_id, model=decoded.model, kind=decoded.kind, round_id=round_id,
            model_version=version, current_version=self.versions(decoded.model),
            instances=instance_outcomes([i.id_sha256 for i in decoded.instances], labels, preds, preds, None),
            received_at=now)
        tx.finish(decoded.request_id, "applied", model=decoded.model, kind=decoded.kind,
                  reason=AlreadyForgottenReceipt.REASON, round_id=round_id, model_version=version, received_at=now)
        self.receipts.append(tx, receipt)
        log.info("request_already_forgotten", request_id=decoded.request_id, model=decoded.model, round_id=round_id)
        return True

    @staticmethod
    def _forgotten_before(tx: LedgerTransaction, decoded: DecodedRequest) -> dict[str, tuple[int, str, int | None]]:
        """``tx.forgotten_before`` by the instances' digests, rows of a pre-schema-3 ledger (plain SHA-256 of the
        id) found too and keyed by the instance's own digest; the newest round wins when both exist."""
        plain = {i.plain_id: i.id_sha256 for i in decoded.instances if i.plain_id}
        found = tx.forgotten_before(decoded.model, [i.id_sha256 for i in decoded.instances] + list(plain))
        before: dict[str, tuple[int, str, int | None]] = {}
        for digest, row in found.items():
            own = plain.get(digest, digest)
            if own not in before or (row[2] or 0, row[1] or "") > (before[own][2] or 0, before[own][1] or ""):
                before[own] = row
        return before

    def _reject(self, tx: LedgerTransaction, rec: Any, fp: str, rej: Rejection, now: float) -> _Effect:
        headers = [("error.reason", rej.reason.encode()), ("error.detail", rej.detail.encode()),
                   ("source.topic", rec.topic.encode()), ("source.partition", str(rec.partition).encode()),
                   ("source.offset", str(rec.offset).encode())]
        tx.enqueue(self.dlq_topic, rec.key, rec.value if rec.value is not None else b"", headers)
        status = ""
        if rej.request_id is not None:
            if tx.request(rej.request_id) is None:
                tx.finish(rej.request_id, "rejected", model=rej.model, kind=rej.kind, reason=rej.reason,
                          received_at=now)
            self.receipts.append(tx, RejectedReceipt(request_id=rej.request_id, model=rej.model, kind=rej.kind,
                                                     reason=rej.reason, detail=rej.detail, received_at=now))
            status = "rejected"
        tx.record_delivery(rec.topic, rec.partition, rec.offset, fp, rej.request_id, "rejected")
        if self.log_each:
            log.debug("request_rejected", request_id=rej.request_id, reason=rej.reason, detail=rej.detail,
                      partition=rec.partition, offset=rec.offset)
        return rej.kind or "unknown", status, rej.reason
