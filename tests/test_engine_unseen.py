"""The ``unseen`` goal (issue 22): a round stops once its instances look like held-out data, never past the zero
rule; a request that already looks held-out ends without a model change; every forget round reports the
membership evidence of its instances."""

from __future__ import annotations

import pytest
import torch

from daemon.engine.evaluate import logits
from daemon.engine.importance_plugin import ImportancePlugin
from daemon.engine.methods import get_method
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import run_round
from daemon.engine.unseen import HeldOutReference, confidence_score, verdict
from tests.engine_fixtures import NUM_CLASSES, fast_config, state_equal, synthetic, tiny_model, train_data


def _heldout() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(32, seed=7)          # the same task, examples the model never trained on


def _round(request, method="adv_imp", **overrides):
    return run_round(tiny_model(), request, get_method(method), fast_config(lr=3e-3, **overrides),
                     generator=torch.Generator().manual_seed(0), num_classes=NUM_CLASSES,
                     importance=ImportancePlugin("none"), sentinel=synthetic(16, seed=1)[0], heldout=_heldout())


def _by_score(n: int, highest: bool) -> ForgetRequest:
    """The ``n`` training instances the model is most (or least) sure of: as member-like as training data gets."""
    x, y = train_data()
    s = confidence_score(logits(tiny_model(), x), y)
    pick = s.argsort(descending=highest)[:n]
    return ForgetRequest("forget", x[pick], y[pick])


def test_the_score_is_the_logit_scaled_confidence_and_the_auc_is_per_class():
    z = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0]])
    s = confidence_score(z, torch.tensor([0, 1]))
    p = torch.softmax(z, 1)[[0, 1], [0, 1]]
    assert torch.allclose(s, (p / (1 - p)).log(), atol=1e-5)
    ref = HeldOutReference(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]), 2)
    ref.by_class = [torch.tensor([1.0, 2.0]).numpy(), torch.tensor([10.0, 20.0]).numpy()]
    ref.all = torch.tensor([1.0, 2.0, 10.0, 20.0]).numpy()
    # a class-0 instance at 3 beats both class-0 references; a class-1 instance at 3 beats none of class 1
    assert ref.auc(torch.tensor([3.0]), torch.tensor([0])) == 1.0
    assert ref.auc(torch.tensor([3.0]), torch.tensor([1])) == 0.0
    assert ref.auc(torch.tensor([2.0]), torch.tensor([0])) == 0.75     # a tie counts half
    assert [verdict(a, 0.03) for a in (0.6, 0.52, 0.4)] == ["under", "indistinguishable", "over"]


def test_unseen_stops_before_the_zero_rule_and_never_after_it():
    request = _by_score(8, highest=True)
    zero = _round(request)
    unseen = _round(request, stop="unseen")
    assert zero.outcome == unseen.outcome == "forgotten"
    assert zero.membership.auc_before > 0.5 + 0.03          # there was something to forget
    assert unseen.stopped_by == "unseen" and zero.stopped_by == "goal"
    assert 0 < unseen.steps < zero.steps
    assert unseen.acc_forget > zero.acc_forget == 0.0       # not pushed to misclassification
    # the evidence is measured after the round, on a fresh scoring of the reference: where the check stopped
    assert unseen.membership.verdict == "indistinguishable" and unseen.membership.auc <= 0.5 + 0.03
    assert zero.membership.auc < unseen.membership.auc
    assert zero.membership.verdict == "over"                # the zero rule's problem, flagged
    assert unseen.check_s > 0 and unseen.check_s < unseen.wall_s


def test_unseen_never_goes_past_the_zero_rule_when_that_comes_first():
    """A margin of 0 asks for the instances to score below half the held-out examples; if misclassification
    comes first, the round stops there, as the zero rule would."""
    request = _by_score(4, highest=True)
    zero = _round(request, method="neggrad")
    unseen = _round(request, method="neggrad", stop="unseen", unseen_margin=0.0)
    assert unseen.steps <= zero.steps
    assert unseen.stopped_by in ("goal", "unseen")
    if unseen.stopped_by == "goal":
        assert unseen.steps == zero.steps and state_equal(unseen.state, zero.state)


def test_an_already_indistinguishable_request_ends_without_a_model_change_and_says_why():
    model = tiny_model()
    request = _by_score(8, highest=False)
    res = _round(request, stop="unseen")
    assert res.outcome == "forgotten" and res.steps == 0 and res.stopped_by == "already_unseen"
    assert state_equal(res.state, model.state_dict())
    assert res.membership.auc <= 0.5 + 0.03 and res.membership.auc == pytest.approx(res.membership.auc_before)
    assert res.membership.verdict in ("indistinguishable", "over")
    assert res.adversarial_examples == 0


def test_unseen_needs_a_forget_request_and_a_held_out_reference():
    x, y = train_data()
    with pytest.raises(ValueError, match="held-out reference"):
        run_round(tiny_model(), ForgetRequest("forget", x[:2], y[:2]), get_method("neggrad"),
                  fast_config(stop="unseen"), generator=torch.Generator().manual_seed(0), num_classes=NUM_CLASSES,
                  importance=ImportancePlugin("none"))
    with pytest.raises(ValueError, match="held-out reference"):
        _round(ForgetRequest("relabel", x[:2], y[:2], targets=(y[:2] + 1) % NUM_CLASSES), stop="unseen")
    with pytest.raises(ValueError, match="unseen_margin"):
        fast_config(unseen_margin=0.5)
