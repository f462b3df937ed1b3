"""Receipt records: each one's to_dict() is the contract's receipt, byte for byte in canonical JSON."""

from __future__ import annotations

import json

from daemon.pipeline.codec import canonical_json
from daemon.pipeline.receipts import (
    AppliedReceipt,
    DuplicateReceipt,
    FailedReceipt,
    RejectedReceipt,
    RoundMetrics,
    instance_outcomes,
)

A, B, C = "a" * 64, "b" * 64, "c" * 64


def _applied() -> AppliedReceipt:
    return AppliedReceipt(request_id="r", model="m", kind="relabel", round_id="r-000002", previous_version=3,
                          method={"name": "adv_imp", "params": {"lr": 0.1}},
                          instances=instance_outcomes([A, B], [7, 1], [7, 1], [2, 3], [2, 3]), forget_accuracy=0.0,
                          probe_accuracy_before=0.99, probe_accuracy_after=float("nan"), received_at=1000.1234)


def test_an_applied_receipt_has_the_contracts_bytes():
    full = _applied().completed(version=4, sha256=C, applied_at=1012.5678).to_dict()
    assert canonical_json(full) == (
        '{"instances":[{"id_sha256":"%s","label":7,"prediction_after":2,"prediction_before":7,"target":2},'
        '{"id_sha256":"%s","label":1,"prediction_after":3,"prediction_before":1,"target":3}],"kind":"relabel",'
        '"method":{"name":"adv_imp","params":{"lr":0.1}},"metrics":{"forget_accuracy":0.0,"probe_accuracy_after":null,'
        '"probe_accuracy_before":0.99},"model":"m","model_sha256":"%s","model_version":4,"previous_version":3,'
        '"reason":null,"request_id":"r","round_id":"r-000002","schema":"unlearn.receipt/v1","status":"applied",'
        '"timings":{"applied_at":"1970-01-01T00:16:52.567Z","received_at":"1970-01-01T00:16:40.123Z",'
        '"time_to_forget_s":12.444}}' % (A, B, C)).encode()


def test_a_draft_survives_the_ledger_and_completes_to_the_same_receipt():
    """Drafts wait in the ledger as JSON (with ``received_ts``) while the version is written: a daemon that
    restarts rolls the round forward from them, so the stored form must give back the same receipt."""
    draft = _applied()
    stored = json.loads(json.dumps(draft.draft_dict()))
    assert stored["received_ts"] == 1000.1234 and stored["model_version"] is None
    again = AppliedReceipt.from_draft(stored)
    done = dict(version=4, sha256=C, applied_at=1012.5678)
    assert again.completed(**done).to_dict() == draft.completed(**done).to_dict()
    assert "received_ts" not in draft.completed(**done).to_dict()
    with_class = AppliedReceipt.from_draft(json.loads(json.dumps({**stored, "class": 3})))
    assert with_class.forget_class == 3 and with_class.to_dict()["class"] == 3


def test_failed_rejected_and_duplicate_receipts_have_the_contracts_fields():
    failed = FailedReceipt(request_id="r", model="m", kind="forget", round_id="r-1", reason="retention gate: x",
                           current_version=2, method={"name": "x"},
                           instances=instance_outcomes([A], [1], [1], None, None), forget_accuracy=float("nan"),
                           received_at=1.0, failed_at=2.5).to_dict()
    assert canonical_json(failed) == (
        '{"instances":[{"id_sha256":"%s","label":1,"prediction_after":null,"prediction_before":1}],"kind":"forget",'
        '"method":{"name":"x"},"metrics":{"forget_accuracy":null},"model":"m","model_sha256":null,"model_version":2,'
        '"previous_version":2,"reason":"retention gate: x","request_id":"r","round_id":"r-1",'
        '"schema":"unlearn.receipt/v1","status":"failed","timings":{"failed_at":"1970-01-01T00:00:02.500Z",'
        '"received_at":"1970-01-01T00:00:01.000Z"}}' % A).encode()
    rejected = RejectedReceipt(None, None, None, "not_json", "d", 3.0).to_dict()
    assert rejected == {"schema": "unlearn.receipt/v1", "request_id": None, "model": None, "kind": None,
                        "status": "rejected", "reason": "not_json", "detail": "d",
                        "timings": {"received_at": "1970-01-01T00:00:03.000Z"}}
    dup = DuplicateReceipt.of(request_id="x", model="m", kind="forget",
                              original={"status": "accepted", "round_id": None, "model_version": None},
                              received_at=4.0).to_dict()
    assert dup["reason"] == "request id seen before; original outcome: pending"
    assert dup["original"] == {"status": "pending", "round_id": None, "model_version": None}
    dup = DuplicateReceipt.of(request_id="x", model="m", kind="forget",
                              original={"status": "applied", "round_id": "r-1", "model_version": 3},
                              received_at=4.0).to_dict()
    assert dup["reason"] == "request id seen before; original outcome: applied in round r-1 (version 3)"


def test_round_metrics_go_to_the_manifest_without_nan_and_with_the_forgotten_classes():
    m = RoundMetrics(0.0, 0.9, float("nan"), 0.95, 1.0, 0.5, 0.1, 0.05, 0.7)
    out = m.manifest_dict(frozenset())
    assert list(out) == ["forget_accuracy", "probe_accuracy_before", "probe_accuracy_original",
                         "param_drift_l2_original", "param_drift_l2_previous", "prediction_flip_ratio_original",
                         "prediction_flip_ratio_previous", "importance_density_ratio"]
    assert m.manifest_dict(frozenset({4, 1}))["forgotten_classes"] == [1, 4]
