"""Receipt bodies (contract §3). Pure functions: the daemon chains them into the audit trail and outbox.

A receipt never holds raw input or a clear instance id: instances appear as ``id_sha256`` only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

__all__ = ["RECEIPT_SCHEMA", "applied_draft", "complete_applied", "duplicate", "failed", "iso", "rejected"]

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


def _instances(id_hashes: Sequence[str], labels: Sequence[int], before: Sequence[int],
               after: Sequence[int] | None, targets: Sequence[int] | None) -> list[dict[str, Any]]:
    out = []
    for i, h in enumerate(id_hashes):
        row: dict[str, Any] = {"id_sha256": h, "label": int(labels[i]), "prediction_before": int(before[i]),
                               "prediction_after": None if after is None else int(after[i])}
        if targets is not None:
            row["target"] = int(targets[i])
        out.append(row)
    return out


def applied_draft(*, request_id: str, model: str, kind: str, round_id: str, previous_version: int,
                  method: Mapping[str, Any], id_hashes: Sequence[str], labels: Sequence[int],
                  targets: Sequence[int] | None, before: Sequence[int], after: Sequence[int],
                  metrics: Mapping[str, float], received_at: float, forget_class: int | None) -> dict[str, Any]:
    """Everything an ``applied`` receipt says except what only the registry write decides."""
    r = _base(request_id, model, "applied", None, kind)
    r.update({"round_id": round_id, "model_version": None, "previous_version": previous_version,
              "model_sha256": None, "method": dict(method),
              "instances": _instances(id_hashes, labels, before, after, targets),
              "metrics": _clean({"forget_accuracy": metrics.get("forget_accuracy"),
                                 "probe_accuracy_before": metrics.get("probe_accuracy_before"),
                                 "probe_accuracy_after": metrics.get("probe_accuracy_after")}),
              "timings": {"received_at": iso(received_at), "applied_at": None, "time_to_forget_s": None},
              "received_ts": received_at})
    if forget_class is not None:
        r["class"] = forget_class
    return r


def complete_applied(draft: Mapping[str, Any], *, version: int, sha256: str, applied_at: float) -> dict[str, Any]:
    r = {k: v for k, v in draft.items() if k != "received_ts"}
    r["model_version"] = version
    r["model_sha256"] = sha256
    r["timings"] = {**draft["timings"], "applied_at": iso(applied_at),
                    "time_to_forget_s": round(applied_at - float(draft["received_ts"]), 3)}
    return r


def failed(*, request_id: str, model: str, kind: str, round_id: str, reason: str, current_version: int,
           method: Mapping[str, Any], id_hashes: Sequence[str], labels: Sequence[int], before: Sequence[int],
           forget_accuracy: float | None, received_at: float, finished_at: float) -> dict[str, Any]:
    r = _base(request_id, model, "failed", reason, kind)
    r.update({"round_id": round_id, "model_version": current_version, "previous_version": current_version,
              "model_sha256": None, "method": dict(method),
              "instances": _instances(id_hashes, labels, before, None, None),
              "metrics": _clean({"forget_accuracy": forget_accuracy}),
              "timings": {"received_at": iso(received_at), "failed_at": iso(finished_at)}})
    return r


def rejected(*, request_id: str | None, model: str | None, kind: str | None, reason: str, detail: str,
             received_at: float) -> dict[str, Any]:
    r = _base(request_id, model, "rejected", reason, kind)
    r.update({"detail": detail, "timings": {"received_at": iso(received_at)}})
    return r


def duplicate(*, request_id: str, model: str | None, kind: str | None, original: Mapping[str, Any],
              received_at: float) -> dict[str, Any]:
    status = original.get("status")
    where = ""
    if original.get("round_id"):
        where = f" in round {original['round_id']}"
    if original.get("model_version") is not None:
        where += f" (version {original['model_version']})"
    r = _base(request_id, model, "duplicate",
              f"request id seen before; original outcome: {'pending' if status == 'accepted' else status}{where}",
              kind)
    r.update({"original": {"status": "pending" if status == "accepted" else status,
                           "round_id": original.get("round_id"), "model_version": original.get("model_version")},
              "timings": {"received_at": iso(received_at)}})
    return r
