"""A model's runtime and the round commit, on a real registry and a real SQLite ledger (no broker)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from daemon import registry
from daemon.pipeline import commit as commit_module
from daemon.pipeline.commit import MODEL_EVENT_SCHEMA, RoundCommitter
from daemon.pipeline.config import ModelSection, RoundsSection
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.receipts import ReceiptChain, RoundMetrics
from daemon.pipeline.runtime import ModelRuntime
from tests.pipeline_harness import copy_registry, pending_request, request

MODEL = "mnist-cnn"


def _runtime(reg, **rounds) -> ModelRuntime:
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-199"), reg,
                           RoundsSection(**{"retention_max_drop": 0.5, **rounds}))
    rt.ensure_model()
    return rt


@pytest.fixture()
def reg(tmp_path, mnist_registry):
    return copy_registry(mnist_registry, tmp_path / "registry")


_pending = pending_request


def _params(rt: ModelRuntime) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in rt.live.model.named_parameters()}


def _committer(ledger: Ledger, reg, *, split_failed: bool = True) -> RoundCommitter:
    return RoundCommitter(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models",
                          method={"name": "adv_imp", "preset": "default"}, split_failed=split_failed,
                          keep_versions=0)


def _receipts(ledger: Ledger) -> list[dict]:
    return [json.loads(r.value) for r in ledger.outbox() if r.topic == "receipts"]


# -- the runtime --------------------------------------------------------------------------------------
def test_a_round_changes_nothing_live_until_published_and_the_manifest_keeps_its_metrics(reg):
    rt = _runtime(reg)
    before = _params(rt)
    candidate = rt.run_round([_pending(rt, request("a", refs=["mnist-train:7"]))], should_abort=lambda: False)
    assert candidate.passed and candidate.metrics is not None
    assert all(torch.equal(before[n], p) for n, p in _params(rt).items())     # rounds never touch the live model
    assert rt.version == 1 and candidate.forgotten_classes == frozenset()
    info = rt.publish(candidate, "r-000001", {"name": "adv_imp"})
    assert info.version == 2 == rt.version and registry.latest_version(reg, MODEL) == 2
    metrics = registry.read_manifest(reg, MODEL, 2)["metrics"]
    assert set(metrics) <= {f.name for f in dataclasses.fields(RoundMetrics)} and "forget_accuracy" in metrics
    assert not all(torch.equal(before[n], p) for n, p in _params(rt).items())


def test_forgotten_classes_are_the_models_state_kept_in_its_manifest(reg):
    rt = _runtime(reg)
    threes = [int(i) for i in torch.nonzero(rt.splits.train_y == 3).flatten()[:4]]
    body = request("c3", "forget_class", [f"mnist-train:{i}" for i in threes], forget_class=3)
    candidate = rt.run_round([_pending(rt, body)], should_abort=lambda: False)
    assert candidate.passed and candidate.forgotten_classes == {3}
    assert rt.forgotten_classes == frozenset()             # not adopted yet
    rt.publish(candidate, "r-000001", {"name": "adv_imp"})
    assert rt.forgotten_classes == {3}
    assert registry.read_manifest(reg, MODEL, 2)["metrics"]["forgotten_classes"] == [3]
    again = _runtime(reg)                                   # a restart reads it back
    assert again.forgotten_classes == {3}
    assert not bool(again.retained_mask()[again.probe_y == 3].any())


def test_the_retention_gate_fails_a_round_and_such_a_candidate_is_never_published(reg):
    rt = _runtime(reg, retention_max_drop=-1.0)              # a floor above any accuracy
    candidate = rt.run_round([_pending(rt, request("a", refs=["mnist-train:7"]))], should_abort=lambda: False)
    assert not candidate.passed and candidate.reason.startswith("retention gate")
    assert candidate.metrics is not None
    with pytest.raises(ValueError, match="only a candidate that passed"):
        rt.publish(candidate, "r-000001", {})
    assert registry.list_versions(reg, MODEL) == [1]


# -- the commit --------------------------------------------------------------------------------------
def test_an_applied_round_is_committed_with_its_receipts_and_the_model_event(reg, tmp_path, ledger_db):
    rt, ledger = _runtime(reg), Ledger(ledger_db.target())
    batch = [_pending(rt, request(rid, refs=[f"mnist-train:{i}"]), offset=i) for i, rid in enumerate(("a", "b"))]
    round_id = ledger.allocate_round(MODEL, "d1", ["a", "b"])
    outcome = _committer(ledger, reg).run(rt, batch, round_id, should_abort=lambda: False)
    assert outcome.status == "applied" and outcome.version.version == 2 and outcome.metrics is not None
    assert ledger.round_state(round_id) == "committed" and ledger.last_committed_version(MODEL) == 2
    assert [ledger.request(r)["status"] for r in ("a", "b")] == ["applied", "applied"]
    receipts = _receipts(ledger)
    assert [(r["request_id"], r["status"], r["model_version"], r["daemon"]) for r in receipts] == [
        ("a", "applied", 2, "d1"), ("b", "applied", 2, "d1")]
    assert receipts[0]["method"]["params"] and receipts[0]["previous_version"] == 1
    assert [len(r["instances"]) for r in receipts] == [1, 1]
    event = json.loads(ledger.outbox()[-1].value)
    assert event["schema"] == MODEL_EVENT_SCHEMA and event["version"] == 2 and event["round_id"] == round_id
    assert ledger.verify_audit() == (2, None)


def test_a_failed_round_is_split_in_halves_or_fails_each_request_with_the_model_unchanged(reg, tmp_path, ledger_db):
    rt, ledger = _runtime(reg, retention_max_drop=-1.0), Ledger(ledger_db.target())
    batch = [_pending(rt, request(rid, refs=[f"mnist-train:{i}"])) for i, rid in enumerate(("a", "b"))]
    split = ledger.allocate_round(MODEL, "d1", ["a", "b"])
    assert _committer(ledger, reg).run(rt, batch, split, should_abort=lambda: False).status == "split"
    assert ledger.round_state(split) == "split" and ledger.outbox() == []
    failed = ledger.allocate_round(MODEL, "d1", ["a", "b"])
    outcome = _committer(ledger, reg, split_failed=False).run(rt, batch, failed, should_abort=lambda: False)
    assert outcome.status == "failed" and ledger.round_state(failed) == "failed"
    receipts = _receipts(ledger)
    assert [(r["status"], r["model_version"]) for r in receipts] == [("failed", 1), ("failed", 1)]
    assert receipts[0]["reason"].startswith("retention gate")
    assert registry.list_versions(reg, MODEL) == [1]


def test_a_round_the_gate_refuses_while_the_models_rebase_runs_is_deferred_with_no_receipt(reg, tmp_path, ledger_db):
    rt, ledger = _runtime(reg, retention_max_drop=-1.0), Ledger(ledger_db.target())
    batch = [_pending(rt, request(rid, refs=[f"mnist-train:{i}"])) for i, rid in enumerate(("a", "b"))]
    committer = _committer(ledger, reg)
    committer.rebasing = lambda model: model == MODEL
    deferred = ledger.allocate_round(MODEL, "d1", ["a", "b"])
    assert committer.run(rt, batch, deferred, should_abort=lambda: False).status == "deferred"
    assert ledger.round_state(deferred) == "deferred" and ledger.outbox() == []     # no receipt: they wait
    assert registry.list_versions(reg, MODEL) == [1]
    committer.rebasing = lambda model: False             # no rebase (any more): the gate fails them as before
    again = ledger.allocate_round(MODEL, "d1", ["a", "b"])
    assert committer.run(rt, batch, again, should_abort=lambda: False).status == "split"


def test_start_up_rolls_a_durable_version_forward_and_abandons_a_round_that_never_reached_the_registry(
        reg, tmp_path, monkeypatch, ledger_db):
    rt, ledger = _runtime(reg), Ledger(ledger_db.target())
    batch = [_pending(rt, request("a", refs=["mnist-train:7"]))]
    crashed = ledger.allocate_round(MODEL, "d1", ["a"])

    def crash_after_the_registry_write(name: str) -> None:
        if name == "after_registry_write":
            raise SystemExit("killed")

    monkeypatch.setattr(commit_module, "failpoint", crash_after_the_registry_write)
    with pytest.raises(SystemExit):
        _committer(ledger, reg).run(rt, batch, crashed, should_abort=lambda: False)
    assert ledger.round_state(crashed) == "committing" and registry.latest_version(reg, MODEL) == 2
    never = ledger.allocate_round(MODEL, "d1", ["b"])
    other = ledger.allocate_round(MODEL, "d2", ["c"])               # another daemon's: not ours to resolve

    restarted = _runtime(reg)
    committer = _committer(ledger, reg)
    committer.recover("d1", {MODEL: restarted})
    assert ledger.round_state(crashed) == "committed" and ledger.round_state(never) == "abandoned"
    assert ledger.round_state(other) == "running"
    (receipt,) = _receipts(ledger)
    assert receipt["status"] == "applied" and receipt["model_version"] == 2 and receipt["round_id"] == crashed
    assert receipt["timings"]["time_to_forget_s"] >= 0
    committer.check_consistency({MODEL: restarted})                  # registry and ledger agree now
