"""Class rounds: the one-sided held term and the ``head_row`` scope (only the class's output row moves)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from daemon.engine.config import UnlearnConfig
from daemon.engine.held import held_logit_term
from daemon.engine.importance_plugin import ImportancePlugin
from daemon.engine.methods import get_method
from daemon.engine.models import output_layer
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import run_round
from tests.engine_fixtures import NUM_CLASSES, fast_config, tiny_model, train_data


def test_the_held_term_is_squared_distance_for_instances():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    held = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert float(held_logit_term(logits, held)) == pytest.approx((14 + 3) / 2)


def test_in_a_class_round_held_examples_may_lose_the_class_logit_but_not_gain_it():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    held = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    value = held_logit_term(logits, held, forget_class=1)
    value.backward()
    assert float(value.detach()) == pytest.approx((14 + 2) / 2)      # row 2 fell in class 1: not penalised
    assert logits.grad[1, 1] == 0 and logits.grad[0, 1] > 0   # a rise is pulled back, a fall is not
    assert logits.grad[1, 0] < 0                               # other classes stay held both ways


def _class_round(scope: str, method: str = "adv_imp"):
    model = tiny_model()
    x, y = train_data()
    cls = 1
    xs = x[y == cls][:6]
    request = ForgetRequest("forget_class", xs, torch.full((6,), cls), forget_class=cls)
    res = run_round(model, request, get_method(method), fast_config(lr=1e-2, class_scope=scope),
                    generator=torch.Generator().manual_seed(0), num_classes=NUM_CLASSES,
                    importance=ImportancePlugin("none"))
    return model, res, cls, x


@pytest.mark.parametrize("method", ["adv_imp", "neggrad", "random_label", "boundary_shrink"])
def test_a_head_row_class_round_moves_only_that_class_row_and_forgets_it(method: str):
    model, res, cls, x = _class_round("head_row", method)
    assert res.outcome == "forgotten" and res.acc_forget == 0.0
    before = model.state_dict()
    head = output_layer(model, NUM_CLASSES)
    head_names = {n for n, p in model.named_parameters() if p is head.weight or p is head.bias}
    assert head_names
    for name, tensor in res.state.items():
        if name in head_names:
            others = [r for r in range(NUM_CLASSES) if r != cls]
            assert torch.equal(tensor[others], before[name][others]), name
            assert not torch.equal(tensor[cls], before[name][cls]), name
        else:
            assert torch.equal(tensor, before[name]), name
    after = tiny_model()
    after.load_state_dict(res.state)
    with torch.no_grad():
        old, new = model(x), after(x)
    others = [c for c in range(NUM_CLASSES) if c != cls]
    assert torch.equal(old[:, others], new[:, others])         # no other class's logit changed anywhere


def test_an_all_scope_class_round_may_move_every_layer():
    model, res, _, _ = _class_round("all")
    assert res.outcome == "forgotten"
    before = model.state_dict()
    changed = [n for n, t in res.state.items() if not torch.equal(t, before[n])]
    assert len(changed) > 2


def test_the_scope_is_validated_and_needs_an_output_layer():
    with pytest.raises(ValueError, match="class_scope"):
        UnlearnConfig(class_scope="rows")
    with pytest.raises(ValueError, match="no Linear layer with 10 outputs"):
        output_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), 10)
