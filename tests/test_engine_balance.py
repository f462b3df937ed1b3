"""The held gradient keeps at least ``held_balance`` times the forget gradient's norm (held.balanced_backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from daemon.engine.config import UnlearnConfig
from daemon.engine.methods import get_method
from daemon.engine.requests import ForgetRequest
from daemon.engine.held import balanced_backward
from daemon.engine.rounds import run_round
from tests.engine_fixtures import NUM_CLASSES, fast_config, forget_set, tiny_model


def _grads(floor: float, balance: float, forget_scale: float) -> tuple[torch.Tensor, float]:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    loss_f = forget_scale * (w * torch.tensor([3.0, 4.0])).sum()      # gradient forget_scale * (3, 4)
    loss_a = (w * torch.tensor([0.0, 1.0])).sum()                     # gradient (0, 1), norm 1
    balanced_backward(loss_f, loss_a, [w], floor, balance, penalty=None)
    return w.grad, 5.0 * forget_scale


@pytest.mark.parametrize("forget_scale", [0.1, 1.0, 100.0])
def test_the_held_gradient_keeps_pace_with_a_growing_forget_gradient(forget_scale: float):
    grad, norm_f = _grads(floor=10.0, balance=1.0, forget_scale=forget_scale)
    scale = max(10.0, norm_f)             # |g_held| = 1
    assert torch.allclose(grad, torch.tensor([3.0, 4.0]) * forget_scale + torch.tensor([0.0, 1.0]) * scale)


def test_a_penalty_adds_its_own_gradient():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    balanced_backward((w * 0).sum() + w[0], w[1] * 1.0, [w], 1.0, 1.0, penalty=(w ** 2).sum())
    assert torch.allclose(w.grad, torch.tensor([1.0 + 2.0, 1.0 + 4.0]))


def test_a_balanced_round_still_forgets_and_differs_from_a_fixed_weight_one():
    x, y = forget_set(4, 8)
    runs = {}
    for balance in (0.0, 1.0):
        runs[balance] = run_round(tiny_model(), ForgetRequest("forget", x, y), get_method("adv"),
                                  fast_config(held_balance=balance, lr=3e-3), generator=torch.Generator().manual_seed(0),
                                  num_classes=NUM_CLASSES)
        assert runs[balance].outcome == "forgotten"
    assert any(not torch.equal(runs[0.0].state[k], runs[1.0].state[k]) for k in runs[0.0].state)


def test_a_negative_balance_is_refused():
    with pytest.raises(ValueError, match="held_balance"):
        UnlearnConfig(held_balance=-1.0)
