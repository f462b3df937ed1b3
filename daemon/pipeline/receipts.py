"""Receipts (contract §3) and a round's metrics, as typed frozen records. Pure: no I/O.

Each receipt record has one :meth:`to_dict`, the receipt's body exactly as the contract has it; the
ledger chains that body into the audit trail and the outbox (:class:`ReceiptChain`), so the
canonical JSON bytes follow from these records alone. A receipt never holds raw input or a clear
instance id: an instance appears as ``id_hmac`` (HMAC-SHA256 of its id under the daemon's id key) with
``id_key`` (that key's id), issue 23; an instance forgotten before keyed digests (a ledger of schema 1 or 2,
in a later ``exact`` receipt) keeps the plain ``id_sha256`` it was recorded with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Union

from daemon.keys import DIGEST_PREFIX, digest_key_id
from daemon.pipeline.ledger import LedgerTransaction

__all__ = [
    "RECEIPT_SCHEMA",
    "AlreadyForgottenReceipt",
    "AppliedReceipt",
    "DuplicateReceipt",
    "ExactReceipt",
    "FailedReceipt",
    "InstanceOutcome",
    "Receipt",
    "ReceiptChain",
    "RejectedReceipt",
    "RoundMetrics",
    "StrandedReceipt",
    "id_fields",
    "instance_outcomes",
    "iso",
]

RECEIPT_SCHEMA = "unlearn.receipt/v1"


@lru_cache(maxsize=64)     # an intake poll stamps all of its receipts with one time
def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _base(request_id: str | None, model: str | None, status: str, reason: str | None, kind: str | None
          ) -> dict[str, Any]:
    return {"schema": RECEIPT_SCHEMA, "request_id": request_id, "model": model, "kind": kind, "status": status,
            "reason": reason}


def _clean(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Strict JSON: a metric that could not be measured (NaN) is reported as null."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()}


def id_fields(digest: str) -> dict[str, str]:
    """An instance's id digest as receipt fields: ``{"id_hmac", "id_key"}`` for a keyed digest, ``{"id_sha256"}``
    for a plain one (recorded before keyed digests)."""
    key_id, mac = digest_key_id(digest)
    return {"id_sha256": mac} if key_id is None else {"id_hmac": mac, "id_key": key_id}


def _digest_of(row: Mapping[str, Any]) -> str:
    """The stored digest back from a receipt's (or draft's) instance fields (:func:`id_fields`' inverse)."""
    if "id_hmac" in row:
        return f"{DIGEST_PREFIX}:{row['id_key']}:{row['id_hmac']}"
    return str(row["id_sha256"])


@dataclass(frozen=True)
class InstanceOutcome:
    """One instance of a decided request: its id's hash, the label used, the predictions around the round."""

    id_sha256: str                          # the id's digest as stored (keyed: daemon.keys.keyed_digest)
    label: int
    prediction_before: int
    prediction_after: int | None = None     # None: the round changed nothing (failed)
    target: int | None = None               # relabel only

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {**id_fields(self.id_sha256), "label": self.label,
                               "prediction_before": self.prediction_before,
                               "prediction_after": self.prediction_after}
        if self.target is not None:
            row["target"] = self.target
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> InstanceOutcome:
        return cls(_digest_of(row), row["label"], row["prediction_before"], row["prediction_after"],
                   row.get("target"))


def instance_outcomes(id_hashes: Sequence[str], labels: Sequence[int], before: Sequence[int],
                      after: Sequence[int] | None, targets: Sequence[int] | None) -> tuple[InstanceOutcome, ...]:
    return tuple(InstanceOutcome(h, int(labels[i]), int(before[i]), None if after is None else int(after[i]),
                                 None if targets is None else int(targets[i]))
                 for i, h in enumerate(id_hashes))


@dataclass(frozen=True)
class RoundMetrics:
    """What a round that ran to the end measured on the probe set and the weights (contract §6 gauges).

    The applied receipt reports the first three; the manifest records all of them (:meth:`manifest_dict`).
    """

    forget_accuracy: float
    probe_accuracy_before: float
    probe_accuracy_after: float
    probe_accuracy_original: float
    param_drift_l2_original: float
    param_drift_l2_previous: float
    prediction_flip_ratio_original: float
    prediction_flip_ratio_previous: float
    importance_density_ratio: float

    def manifest_dict(self, forgotten_classes: frozenset[int]) -> dict[str, Any]:
        """The manifest's ``metrics``: every measured value (NaN is not JSON), and the forgotten classes if any."""
        out: dict[str, Any] = {k: v for k, v in dataclasses.asdict(self).items() if v == v}
        if forgotten_classes:
            out["forgotten_classes"] = sorted(forgotten_classes)
        return out


@dataclass(frozen=True)
class _RoundReceipt:
    """What every receipt of a round's outcome names: the request and the round that decided it."""

    request_id: str
    model: str
    kind: str
    round_id: str


@dataclass(frozen=True)
class AppliedReceipt(_RoundReceipt):
    """An ``applied`` receipt; a *draft* (before the registry write) has no version, hash or ``applied_at``."""

    previous_version: int
    method: Mapping[str, Any]
    instances: tuple[InstanceOutcome, ...]
    forget_accuracy: float | None
    probe_accuracy_before: float | None
    probe_accuracy_after: float | None
    received_at: float                      # wall clock (epoch seconds)
    forget_class: int | None = None
    model_version: int | None = None
    model_sha256: str | None = None
    applied_at: float | None = None
    content_hashes: tuple[str, ...] = ()    # per instance (daemon.data.content): kept by the ledger, not sent
    #: the round's goal (forget: misclassify or unseen; None for kinds whose goal is their own)
    goal: str | None = None
    #: the instances' membership against the held-out probe set after the round (``daemon.engine.unseen``:
    #: score, AUC with its interval, verdict, what stopped the round); None where not measured
    membership: Mapping[str, Any] | None = None

    def completed(self, *, version: int, sha256: str, applied_at: float) -> AppliedReceipt:
        """The receipt once the version is durable."""
        return dataclasses.replace(self, model_version=version, model_sha256=sha256, applied_at=applied_at)

    def to_dict(self) -> dict[str, Any]:
        r = _base(self.request_id, self.model, "applied", None, self.kind)
        if self.applied_at is None:
            timings = {"received_at": iso(self.received_at), "applied_at": None, "time_to_forget_s": None}
        else:
            timings = {"received_at": iso(self.received_at), "applied_at": iso(self.applied_at),
                       "time_to_forget_s": round(self.applied_at - self.received_at, 3)}
        r.update({"round_id": self.round_id, "model_version": self.model_version,
                  "previous_version": self.previous_version, "model_sha256": self.model_sha256,
                  "method": dict(self.method), "instances": [i.to_dict() for i in self.instances],
                  "metrics": _clean({"forget_accuracy": self.forget_accuracy,
                                     "probe_accuracy_before": self.probe_accuracy_before,
                                     "probe_accuracy_after": self.probe_accuracy_after}),
                  "timings": timings})
        if self.forget_class is not None:
            r["class"] = self.forget_class
        if self.goal is not None:
            r["goal"] = self.goal
            r["membership"] = _clean(dict(self.membership)) if self.membership is not None else None
        return r

    # The ledger keeps a committing round's drafts as JSON (``rounds.drafts``) until the commit: the body of the
    # draft plus ``received_ts``, the precise receive time that ``time_to_forget_s`` is computed from. That form
    # is durable state (a daemon may restart on drafts an older one wrote), so it stays as it was.
    def draft_dict(self) -> dict[str, Any]:
        return {**self.to_dict(), "received_ts": self.received_at, "content_sha256": list(self.content_hashes)}

    @classmethod
    def from_draft(cls, d: Mapping[str, Any]) -> AppliedReceipt:
        metrics = d.get("metrics") or {}
        return cls(request_id=d["request_id"], model=d["model"], kind=d["kind"], round_id=d["round_id"],
                   previous_version=d["previous_version"], method=d["method"],
                   instances=tuple(InstanceOutcome.from_dict(i) for i in d["instances"]),
                   forget_accuracy=metrics.get("forget_accuracy"),
                   probe_accuracy_before=metrics.get("probe_accuracy_before"),
                   probe_accuracy_after=metrics.get("probe_accuracy_after"),
                   received_at=float(d["received_ts"]), forget_class=d.get("class"),
                   content_hashes=tuple(d.get("content_sha256") or ()),     # drafts from before schema 2: none
                   goal=d.get("goal"), membership=d.get("membership"))      # drafts from before issue 22: none


@dataclass(frozen=True)
class FailedReceipt(_RoundReceipt):
    """A ``failed`` receipt: the round ran and did not pass; the model stays at ``current_version``."""

    reason: str
    current_version: int
    method: Mapping[str, Any]
    instances: tuple[InstanceOutcome, ...]
    forget_accuracy: float | None
    received_at: float
    failed_at: float

    def to_dict(self) -> dict[str, Any]:
        r = _base(self.request_id, self.model, "failed", self.reason, self.kind)
        r.update({"round_id": self.round_id, "model_version": self.current_version,
                  "previous_version": self.current_version, "model_sha256": None, "method": dict(self.method),
                  "instances": [i.to_dict() for i in self.instances],
                  "metrics": _clean({"forget_accuracy": self.forget_accuracy}),
                  "timings": {"received_at": iso(self.received_at), "failed_at": iso(self.failed_at)}})
        return r


@dataclass(frozen=True)
class AlreadyForgottenReceipt:
    """An ``applied`` receipt with reason ``already_forgotten``: every instance of a ``forget`` request was forgotten
    by an earlier round of this model (same id hash) and the published model still does not predict the label it
    was forgotten as. Nothing new runs: ``round_id`` / ``model_version`` name that earlier round and its version
    (the newest, when instances came from several), and each instance shows its label and current prediction."""

    request_id: str
    model: str
    kind: str
    round_id: str | None
    model_version: int | None
    current_version: int | None
    instances: tuple[InstanceOutcome, ...]
    received_at: float

    REASON = "already_forgotten"

    def to_dict(self) -> dict[str, Any]:
        r = _base(self.request_id, self.model, "applied",
                  f"{self.REASON}: every instance was forgotten before (round {self.round_id}) and the published "
                  f"model (version {self.current_version}) still does not predict its label; no new version",
                  self.kind)
        r.update({"round_id": self.round_id, "model_version": self.model_version,
                  "previous_version": self.current_version, "model_sha256": None,
                  "instances": [i.to_dict() for i in self.instances],
                  "timings": {"received_at": iso(self.received_at), "applied_at": iso(self.received_at),
                              "time_to_forget_s": 0.0}})
        return r


@dataclass(frozen=True)
class StrandedReceipt:
    """A ``failed`` receipt for a request that was accepted but whose round was lost with the daemon while the
    broker lost its message: nothing of it was applied, no round can run it (its inputs were only ever in the
    lost message), and the publisher must send it again; a resubmission of the same ``request_id`` is accepted.

    ``round_id``: the round that held it when the daemon stopped (None: it never reached one); ``evidence``:
    why the broker cannot redeliver it."""

    request_id: str
    model: str | None
    kind: str | None
    round_id: str | None
    evidence: str
    current_version: int | None
    received_at: float
    failed_at: float

    REASON = "stranded"

    def to_dict(self) -> dict[str, Any]:
        r = _base(self.request_id, self.model, "failed",
                  f"{self.REASON}: accepted, but the daemon stopped before it was applied and the broker can no "
                  f"longer redeliver it ({self.evidence}); nothing was applied: resubmit it with the same "
                  f"request_id", self.kind)
        r.update({"round_id": self.round_id, "model_version": self.current_version,
                  "previous_version": self.current_version, "model_sha256": None, "resubmit": True,
                  "instances": [],
                  "timings": {"received_at": iso(self.received_at), "failed_at": iso(self.failed_at)}})
        return r


@dataclass(frozen=True)
class RejectedReceipt:
    """A ``rejected`` receipt: the message named a request id but could not be accepted (``reason``: contract §5)."""

    request_id: str | None
    model: str | None
    kind: str | None
    reason: str
    detail: str
    received_at: float

    def to_dict(self) -> dict[str, Any]:
        r = _base(self.request_id, self.model, "rejected", self.reason, self.kind)
        r.update({"detail": self.detail, "timings": {"received_at": iso(self.received_at)}})
        return r


@dataclass(frozen=True)
class DuplicateReceipt:
    """A ``duplicate`` receipt: the request id was seen before; it says what became of the original."""

    request_id: str
    model: str | None
    kind: str | None
    original_status: str | None          # the ledger's status: accepted (reported as pending), applied, ...
    original_round_id: str | None
    original_model_version: int | None
    received_at: float

    @classmethod
    def of(cls, *, request_id: str, model: str | None, kind: str | None, original: Mapping[str, Any],
           received_at: float) -> DuplicateReceipt:
        """From the original request's ledger row."""
        return cls(request_id, model, kind, original.get("status"), original.get("round_id"),
                   original.get("model_version"), received_at)

    def to_dict(self) -> dict[str, Any]:
        status = "pending" if self.original_status == "accepted" else self.original_status
        where = ""
        if self.original_round_id:
            where = f" in round {self.original_round_id}"
        if self.original_model_version is not None:
            where += f" (version {self.original_model_version})"
        r = _base(self.request_id, self.model, "duplicate",
                  f"request id seen before; original outcome: {status}{where}", self.kind)
        r.update({"original": {"status": status, "round_id": self.original_round_id,
                               "model_version": self.original_model_version},
                  "timings": {"received_at": iso(self.received_at)}})
        return r


@dataclass(frozen=True)
class ExactReceipt:
    """An ``exact`` receipt: a rebase retrained the model without every instance of an applied request.

    Not a second outcome: the request's ``applied`` receipt stands; this one upgrades it (contract §3). Sent
    once per request, by the first rebase that left all of its instances out (later rebases leave them out
    too, and say so in their manifests). Each instance says what the rebase did with it: ``excluded``,
    ``relabeled`` (a relabel request's item, trained with its target) or ``not_in_source`` (not an item of
    the training source: the rebased model never saw it). A *draft* (before the version is durable) has no
    version, hash or time.
    """

    request_id: str
    model: str
    kind: str
    rebase_id: str
    previous_version: int
    rebase: Mapping[str, Any]               # source, excluded, forgotten, digest
    instances: tuple[tuple[str, str], ...]  # (id_sha256, what the rebase did with it)
    model_version: int | None = None
    model_sha256: str | None = None
    exact_at: float | None = None

    def completed(self, *, version: int, sha256: str, exact_at: float) -> ExactReceipt:
        return dataclasses.replace(self, model_version=version, model_sha256=sha256, exact_at=exact_at)

    def to_dict(self) -> dict[str, Any]:
        r = _base(self.request_id, self.model, "exact", None, self.kind)
        r.update({"rebase_id": self.rebase_id, "model_version": self.model_version,
                  "previous_version": self.previous_version, "model_sha256": self.model_sha256,
                  "rebase": dict(self.rebase),
                  "instances": [{**id_fields(h), "rebase": what} for h, what in self.instances],
                  "timings": {"exact_at": None if self.exact_at is None else iso(self.exact_at)}})
        return r

    @classmethod
    def from_draft(cls, d: Mapping[str, Any]) -> ExactReceipt:
        return cls(request_id=d["request_id"], model=d["model"], kind=d["kind"], rebase_id=d["rebase_id"],
                   previous_version=d["previous_version"], rebase=d["rebase"],
                   instances=tuple((_digest_of(i), i["rebase"]) for i in d["instances"]))


Receipt = Union[AppliedReceipt, AlreadyForgottenReceipt, FailedReceipt, StrandedReceipt, RejectedReceipt,
                DuplicateReceipt, ExactReceipt]


@dataclass(frozen=True)
class ReceiptChain:
    """Where this daemon's receipts go: into the audit trail and the outbox for ``topic``, naming the daemon."""

    daemon: str
    topic: str

    def append(self, tx: LedgerTransaction, receipt: Receipt) -> None:
        tx.append_receipt({**receipt.to_dict(), "daemon": self.daemon}, self.topic)
