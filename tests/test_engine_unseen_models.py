"""The ``unseen`` goal with reference models (issue 22): each instance is judged against the scores models that
never trained on it give it, so a memorised mislabeled record is called member-like (the probe check calls it
forgotten), and the round pushes it past the zero rule down to those scores — and not further."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from daemon.engine.evaluate import logits
from daemon.engine.importance_plugin import ImportancePlugin
from daemon.engine.methods import get_method
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import run_round
from daemon.engine.training import TrainConfig, train_classifier
from daemon.engine.unseen import MAX_Z, MIN_SIGMA, SCORE_MODELS, ModelReference, confidence_score
from tests.engine_fixtures import NUM_CLASSES, fast_config, new_model, state_equal, synthetic, train_data

CANARIES = 4
COPIES = 4
RECIPE = TrainConfig(epochs=12, batch_size=32, max_lr=1e-2, shift=0, seed=0, label_smoothing=0.0)


def _canaries() -> tuple[torch.Tensor, torch.Tensor]:
    """Training instances at a wrong label (the next class): what a model can only get right by memorising."""
    x, y = train_data()
    return x[:CANARIES].clone(), (y[:CANARIES] + 1) % NUM_CLASSES


def _train(seed: int, with_canaries: bool) -> dict[str, torch.Tensor]:
    x, y = train_data()
    x, y = x[CANARIES:], y[CANARIES:]                 # the canaries' own images are only ever in at a wrong label
    if with_canaries:
        cx, cy = _canaries()
        x, y = torch.cat([x] + [cx] * COPIES), torch.cat([y] + [cy] * COPIES)
    model = new_model(seed)
    train_classifier(model, x, y, TrainConfig(**{**RECIPE.__dict__, "seed": seed}))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _states() -> tuple[dict[str, torch.Tensor], tuple[dict[str, torch.Tensor], ...]]:
    """The target (trained with the canaries) and three references (the same recipe without them)."""
    return _train(0, True), tuple(_train(s, False) for s in (11, 12, 13))


def _model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    m = new_model(0)
    m.load_state_dict(state)
    return m.eval()


def _reference_scores(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([confidence_score(logits(_model(s), x), y) for s in _states()[1]], dim=1)


def _round(request: ForgetRequest, *, scores: torch.Tensor | None, **overrides):
    heldout = synthetic(32, seed=7)
    return run_round(_model(_states()[0]), request, get_method("adv_imp"),
                     fast_config(**{"lr": 3e-3, "max_steps": 300, **overrides}), generator=torch.Generator().manual_seed(0),
                     num_classes=NUM_CLASSES, importance=ImportancePlugin("none"), sentinel=synthetic(16, seed=1)[0],
                     heldout=heldout, reference_scores=scores)


def test_the_statistic_is_the_chance_of_beating_a_model_that_never_saw_the_instance():
    out = torch.tensor([[0.0, 1.0, 2.0], [5.0, 6.0, 7.0]])
    ref = ModelReference(out)
    assert torch.allclose(ref.targets(), torch.tensor([1.0, 6.0]))
    assert ref.sigma == pytest.approx(1.0)                      # pooled: both rows have sample spread 1
    assert ref.auc(torch.tensor([1.0, 6.0]), torch.tensor([0, 0])) == pytest.approx(0.5)
    assert ref.auc(torch.tensor([4.0, 9.0]), torch.tensor([0, 0])) == pytest.approx(0.5 * (1 + math.erf(3 / 2 ** 0.5)))
    assert ref.auc(torch.tensor([-9.0, -4.0]), torch.tensor([0, 0])) < 1e-6
    ev = ref.evidence(torch.tensor([1.0, 6.0]), torch.tensor([0, 0]), 0.03)
    assert ev.verdict == "indistinguishable" and ev.to_dict()["reference"] == "models"
    assert ev.to_dict()["score"] == SCORE_MODELS and ev.n_reference == 3


def test_references_that_trained_on_an_instance_are_left_out_and_one_is_enough():
    nan = float("nan")
    ref = ModelReference(torch.tensor([[nan, 2.0, 4.0], [3.0, nan, nan]]))
    assert torch.allclose(ref.targets(), torch.tensor([3.0, 3.0]))
    assert ref.sigma == pytest.approx(2 ** 0.5)                 # only the row with two scores has a spread
    assert ModelReference(torch.tensor([[1.0], [1.0]])).sigma == 1.0   # no spread at all: 1, not 0
    assert ModelReference(torch.tensor([[1.0, 1.0]])).sigma == MIN_SIGMA
    with pytest.raises(ValueError, match=r"instances \[1\]"):
        ModelReference(torch.tensor([[1.0, 2.0], [nan, nan]]))
    with pytest.raises(ValueError, match="at least one model"):
        ModelReference(torch.zeros(3, 0))


def test_a_memorised_mislabeled_instance_is_member_like_per_example_though_the_probe_calls_it_forgotten():
    x, y = _canaries()
    target = _model(_states()[0])
    assert bool((target(x).argmax(1) == y).all())               # memorised at the wrong label
    probe = _round(ForgetRequest("forget", x, y), scores=None, max_steps=1)
    per_example = _round(ForgetRequest("forget", x, y), scores=_reference_scores(x, y), max_steps=1)
    assert per_example.membership.auc_before > 0.95             # far above what models that never saw them give
    assert probe.membership.verdict == "over" and probe.membership.auc_before < 0.5   # the probe check is blind


def test_unseen_with_references_goes_past_the_zero_rule_to_the_references_scores_and_no_further():
    x, y = _canaries()
    request = ForgetRequest("forget", x, y)
    scores = _reference_scores(x, y)
    zero = _round(request, scores=scores)
    unseen = _round(request, scores=scores, stop="unseen")
    assert zero.outcome == unseen.outcome == "forgotten"
    assert zero.stopped_by == "goal" and unseen.stopped_by == "unseen"
    assert zero.membership.verdict == "under"                   # misclassified, yet still far more confident
    assert unseen.steps > zero.steps and unseen.acc_forget == 0.0
    assert unseen.membership.verdict == "indistinguishable" and unseen.membership.auc <= 0.53
    after = confidence_score(logits(_model(unseen.state), x), y)
    ref = ModelReference(scores)
    # each instance ends near its own target, none pushed far below it (the hinge stops at the target)
    assert float((after - ref.targets()).min()) > -3 * ref.sigma
    assert float((after - ref.targets()).abs().mean()) < 2 * ref.sigma


def test_an_instance_no_model_trained_on_already_looks_unseen_and_the_model_is_left_alone():
    x, y = synthetic(2, seed=21)                                # new draws: neither target nor references saw them
    result = _round(ForgetRequest("forget", x, y), scores=_reference_scores(x, y), stop="unseen")
    assert result.outcome == "forgotten" and result.stopped_by == "already_unseen" and result.steps == 0
    assert state_equal(result.state, _states()[0])
    assert result.membership.verdict != "under"


def test_reference_scores_must_match_the_request():
    x, y = _canaries()
    with pytest.raises(ValueError, match="reference scores for 3 instances"):
        _round(ForgetRequest("forget", x, y), scores=torch.zeros(3, 2), stop="unseen")


def test_a_mean_at_half_does_not_stop_a_round_that_leaves_an_instance_far_above_its_target():
    """Half the instances far below their targets and half far above average to 0.5: the mean alone would call
    the request already unseen; the per-example stop goes on until none is more than MAX_Z spreads above."""
    x, y = _canaries()
    scores = _reference_scores(x, y)
    now = confidence_score(logits(_model(_states()[0]), x), y)
    scores[:2] = now[:2, None].double() + 20.0 + torch.arange(3.0)   # these two: already far below their targets
    ref = ModelReference(scores)
    assert abs(ref.auc(now, y) - 0.5) < 0.03 and not ref.none_far_above(now)
    result = _round(ForgetRequest("forget", x, y), scores=scores, stop="unseen")
    assert result.stopped_by == "unseen" and result.steps > 0
    assert bool((ref.z(confidence_score(logits(_model(result.state), x), y)) <= MAX_Z).all())
