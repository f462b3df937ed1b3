"""The ``unseen`` goal through the daemon's round (issue 22), on a real registry (the session's pretrained MNIST
model) and a real SQLite ledger: the model's default goal and a request's own, the membership evidence in every
applied forget receipt, an already-unseen request that leaves the weights as they were, and the metrics."""

from __future__ import annotations

import json

import pytest
import torch

from daemon.engine.evaluate import logits
from daemon.engine.unseen import confidence_score
from daemon.pipeline.commit import RoundCommitter
from daemon.pipeline.config import ModelSection, RoundsSection
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.receipts import AppliedReceipt, ReceiptChain
from daemon.pipeline.runtime import ModelRuntime
from tests.pipeline_harness import copy_registry, pending_request, request

MODEL = "mnist-cnn"


@pytest.fixture()
def reg(tmp_path, mnist_registry):
    return copy_registry(mnist_registry, tmp_path / "registry")


def _runtime(reg, goal: str = "misclassify") -> ModelRuntime:
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-499", goal=goal), reg,
                           RoundsSection(retention_max_drop=0.5))
    rt.ensure_model()
    return rt


def _ranked(rt: ModelRuntime, n: int = 300) -> list[int]:
    """The first ``n`` training digits, most member-like first (the model's confidence in their label)."""
    x, y = rt.splits.train_x[:n], rt.splits.train_y[:n]
    s = confidence_score(logits(rt.live.model, x), y)
    return [int(i) for i in s.argsort(descending=True)]


def _body(rid: str, refs: list[int], goal: str | None) -> dict:
    body = request(rid, refs=[f"mnist-train:{i}" for i in refs])
    if goal is not None:
        body["goal"] = goal
    return body


def _apply(rt, reg, tmp_path, bodies) -> tuple[object, list[dict]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(tmp_path / "l.sqlite")
    batch = [pending_request(rt, b, offset=i) for i, b in enumerate(bodies)]
    round_id = ledger.allocate_round(MODEL, "d1", [b["request_id"] for b in bodies])
    committer = RoundCommitter(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models",
                               method={"name": "adv_imp", "preset": "default"}, split_failed=False, keep_versions=0)
    outcome = committer.run(rt, batch, round_id, should_abort=lambda: False)
    return outcome, [json.loads(r.value) for r in ledger.outbox() if r.topic == "receipts"]


@pytest.mark.slow
def test_unseen_stops_before_misclassifying_and_every_forget_receipt_carries_its_evidence(reg, tmp_path,
                                                                                         mnist_registry):
    """The same four most member-like digits: ``unseen`` (the request's own goal) stops on the membership check
    with fewer steps and the digits still mostly classified as their label; ``misclassify`` (the model's default)
    pushes them past the boundary, and its receipt says they are now less member-like than held-out data."""
    top = _ranked(_runtime(reg))[:4]
    unseen, receipts_u = _apply(_runtime(reg), reg, tmp_path, [_body("u", top, "unseen")])
    other = copy_registry(mnist_registry, tmp_path / "registry-z")     # the same start: version 1
    zero, receipts_z = _apply(_runtime(other), other, tmp_path / "z", [_body("z", top, None)])
    assert unseen.status == zero.status == "applied"
    (ru,), (rz,) = receipts_u, receipts_z
    assert ru["goal"] == "unseen" and rz["goal"] == "misclassify"
    mu, mz = ru["membership"], rz["membership"]
    assert mu["stopped_by"] == "unseen" and mz["stopped_by"] == "goal"
    assert mu["auc_before"] == mz["auc_before"] > 0.5 + mu["margin"]
    assert 0 < mu["steps"] < mz["steps"]
    assert mu["verdict"] == "indistinguishable" and mu["auc"] <= 0.5 + mu["margin"]
    assert mz["verdict"] == "over" and mz["auc"] < mu["auc"]
    assert ru["metrics"]["forget_accuracy"] > rz["metrics"]["forget_accuracy"] == 0.0
    for m in (mu, mz):
        lo, hi = m["auc_ci95"]
        assert lo <= m["auc"] <= hi and m["score"].startswith("lira") and m["reference"] == "probe"
        assert m["reference_size"] == 500 and m["instances"] == 4 and 0 < m["check_s"]
    # the draft the ledger keeps through a commit carries them too
    draft = AppliedReceipt(request_id="x", model=MODEL, kind="forget", round_id="r", previous_version=1, method={},
                           instances=(), forget_accuracy=None, probe_accuracy_before=None, probe_accuracy_after=None,
                           received_at=0.0, goal="unseen", membership=mu).draft_dict()
    back = AppliedReceipt.from_draft(json.loads(json.dumps(draft)))
    assert back.goal == "unseen" and back.membership == mu
    # the metrics: the round's AUC per model, and a count per verdict (the over-forgetting alert reads "over")
    metrics = DaemonMetrics()
    metrics.export_membership(MODEL, unseen.result.membership)
    metrics.export_membership(MODEL, zero.result.membership)
    sample = metrics.registry.get_sample_value
    assert sample("unlearnd_membership_auc", {"model": MODEL}) == pytest.approx(mz["auc"], abs=1e-4)
    counts = {v: sample("unlearnd_membership_verdicts_total", {"model": MODEL, "verdict": v})
              for v in ("under", "indistinguishable", "over")}
    assert counts == {"under": 0.0, "indistinguishable": 1.0, "over": 1.0}


def test_an_already_unseen_request_under_the_models_default_goal_leaves_the_weights_and_says_why(reg, tmp_path):
    """The model's default goal ``unseen``; a request naming no goal, of the digits the model is least sure of
    (they already score below held-out digits of their class): no step, the new version's weights are the old
    ones, and the receipt says so with the evidence."""
    rt = _runtime(reg, goal="unseen")
    low = _ranked(rt)[-3:]
    before = {n: p.detach().clone() for n, p in rt.live.model.named_parameters()}
    outcome, (receipt,) = _apply(rt, reg, tmp_path, [_body("low", low, None)])
    assert outcome.status == "applied" and outcome.result.steps == 0
    assert all(torch.equal(before[n], p) for n, p in rt.live.model.named_parameters())
    m = receipt["membership"]
    assert receipt["goal"] == "unseen" and m["stopped_by"] == "already_unseen" and m["steps"] == 0
    assert m["auc"] == m["auc_before"] <= 0.5 + m["margin"] and m["verdict"] in ("indistinguishable", "over")


def test_kinds_with_a_goal_of_their_own_carry_no_goal_and_no_evidence(reg, tmp_path):
    rt = _runtime(reg, goal="unseen")
    body = request("r", "relabel", ["mnist-train:0"], targets=[int(rt.splits.train_y[0] + 1) % 10])
    outcome, (receipt,) = _apply(rt, reg, tmp_path, [body])
    assert outcome.status == "applied" and outcome.result.membership is None
    assert "goal" not in receipt and "membership" not in receipt


def test_the_models_default_goal_comes_from_the_file_or_the_environment_and_a_bad_one_names_the_setting(tmp_path):
    from daemon.pipeline.config import ConfigError, load_config

    assert load_config(None, env={}).models[0].goal == "misclassify"      # old configurations mean what they meant
    assert load_config(None, env={"UNLEARND_MODELS_0_GOAL": "unseen"}).models[0].goal == "unseen"
    path = tmp_path / "u.toml"
    path.write_text('[[models]]\nname = "mnist-cnn"\ngoal = "unseen"\n')
    assert load_config(path, env={}).models[0].goal == "unseen"
    path.write_text('[[models]]\nname = "mnist-cnn"\ngoal = "forgotten"\n')
    with pytest.raises(ConfigError, match=r"models\[0\]\.goal"):
        load_config(path, env={})


def test_stop_unseen_in_a_models_settings_is_refused_naming_the_goal_setting():
    """``settings = ["stop=unseen"]`` would reach relabel and forget_class rounds, which have no such rule."""
    from daemon.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"models\[0\]\.settings.*goal"):
        load_config(None, env={"UNLEARND_MODELS_0_SETTINGS": "stop=unseen"})
