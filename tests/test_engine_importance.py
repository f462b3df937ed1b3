"""daemon.engine.importance: MAS estimation, the inverted min–max anchor weights, accumulation, the penalty."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from daemon.engine.importance import (
    ACCUMULATIONS,
    ImportanceRegulariser,
    accumulate,
    anchor_weights,
    importance_density,
    mas_importance,
)
from tests.engine_fixtures import forget_set, tiny_model


def _linear(seed: int = 0) -> nn.Sequential:
    """g(x) = W·flatten(x) + b on 1×2×2 inputs: small enough for closed forms."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


# -- mas_importance ---------------------------------------------------------------------------------

def test_mas_importance_is_non_negative_for_every_trainable_parameter_and_skips_frozen_ones():
    model = tiny_model()
    frozen_name, frozen = next(iter(model.named_parameters()))
    frozen.requires_grad_(False)
    x, _ = forget_set(6)
    imp = mas_importance(model, x, batch_size=4)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(imp) == set(trainable) and frozen_name not in imp
    for name, t in imp.items():
        assert t.shape == trainable[name].shape
        assert not t.requires_grad
        assert bool(torch.isfinite(t).all()) and float(t.min()) >= 0
    assert any(float(t.max()) > 0 for t in imp.values())


@pytest.mark.parametrize("start_training", [True, False])
def test_mas_importance_leaves_the_model_its_mode_and_its_grads_alone(start_training):
    model = tiny_model()
    model.train(start_training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mas_importance(model, forget_set(4)[0])
    assert model.training is start_training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_mas_importance_matches_the_closed_form_of_the_logit_norm_gradient():
    """One batch: |∂ mean_i ‖W x_i + b‖ / ∂W| = |mean_i z_i x_iᵀ / ‖z_i‖|.

    With one example per batch it is the mean of the per-example absolute gradients instead.
    """
    model = _linear()
    x = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    w, b = model[1].weight.detach(), model[1].bias.detach()
    flat = x.flatten(1)
    z = flat @ w.T + b
    per_w = (z / z.norm(dim=1, keepdim=True)).unsqueeze(2) * flat.unsqueeze(1)   # N×3×4
    per_b = z / z.norm(dim=1, keepdim=True)                                       # N×3
    whole = mas_importance(model, x, batch_size=256)
    torch.testing.assert_close(whole["1.weight"], per_w.mean(0).abs())
    torch.testing.assert_close(whole["1.bias"], per_b.mean(0).abs())
    single = mas_importance(model, x, batch_size=1)
    torch.testing.assert_close(single["1.weight"], per_w.abs().mean(0))
    torch.testing.assert_close(single["1.bias"], per_b.abs().mean(0))


@pytest.mark.parametrize("x", [torch.empty(0, 1, 2, 2), torch.rand(3, 4)])
def test_mas_importance_rejects_an_empty_or_flat_batch(x):
    with pytest.raises(ValueError, match="non-empty N×C×H×W"):
        mas_importance(_linear(), x)


# -- anchor_weights ---------------------------------------------------------------------------------

def test_anchor_weights_lie_in_unit_range_with_min_0_and_max_1_per_tensor():
    raw = mas_importance(tiny_model(), forget_set(4)[0])
    weights = anchor_weights(raw)
    assert set(weights) == set(raw)
    for name, w in weights.items():
        assert w.shape == raw[name].shape
        assert float(w.min()) >= 0 and float(w.max()) <= 1
        if float(raw[name].max() - raw[name].min()) > 0:
            assert float(w.min()) == pytest.approx(0.0, abs=1e-6)
            assert float(w.max()) == pytest.approx(1.0, abs=1e-6)
            # inverted: the most important entry is the least anchored
            assert float(w.flatten()[raw[name].argmax()]) == pytest.approx(0.0, abs=1e-6)


def test_anchor_weights_invert_the_min_max_scale_and_map_constant_tensors_to_ones():
    raw = {"ramp": torch.tensor([0.0, 1.0, 2.0, 4.0]), "flat": torch.full((2, 3), 0.7),
           "zeros": torch.zeros(3)}
    w = anchor_weights(raw)
    torch.testing.assert_close(w["ramp"], torch.tensor([1.0, 0.75, 0.5, 0.0]))
    assert torch.equal(w["flat"], torch.ones(2, 3))
    assert torch.equal(w["zeros"], torch.ones(3))
    assert not any(bool(torch.isnan(t).any()) for t in w.values())


# -- accumulate ------------------------------------------------------------------------------------

PREV = {"a": torch.tensor([0.0, 0.5, 1.0]), "b": torch.tensor([[1.0, 0.2]])}
CUR = {"a": torch.tensor([1.0, 0.25, 0.0]), "b": torch.tensor([[0.0, 0.6]])}


@pytest.mark.parametrize("mode, expected", [
    ("none", CUR),
    ("sum", {"a": torch.tensor([1.0, 0.75, 1.0]), "b": torch.tensor([[1.0, 0.8]])}),
    ("max", {"a": torch.tensor([1.0, 0.5, 1.0]), "b": torch.tensor([[1.0, 0.6]])}),
    ("decayed", {"a": torch.tensor([1.0, 0.5, 0.5]), "b": torch.tensor([[0.5, 0.7]])}),
])
def test_accumulate_combines_rounds_as_documented(mode, expected):
    out = accumulate(PREV, CUR, mode, decay=0.5)
    assert set(out) == set(expected)
    for name, t in expected.items():
        torch.testing.assert_close(out[name], t)
    assert all(out[n] is not CUR[n] for n in out)           # copies, never the caller's tensors


def test_accumulate_decayed_uses_the_decay_factor():
    out = accumulate(PREV, CUR, "decayed", decay=0.25)
    torch.testing.assert_close(out["a"], torch.tensor([1.0, 0.375, 0.25]))


@pytest.mark.parametrize("mode", ACCUMULATIONS)
def test_the_first_round_and_new_tensors_take_the_current_weights(mode):
    first = accumulate(None, CUR, mode)
    assert all(torch.equal(first[n], CUR[n]) for n in CUR)
    grown = accumulate({"a": PREV["a"]}, CUR, mode)
    assert torch.equal(grown["b"], CUR["b"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="mean"), "unknown accumulation 'mean'"),
    (dict(mode="decayed", decay=1.5), r"decay must lie in \[0, 1\]"),
    (dict(mode="sum", decay=-0.1), r"decay must lie in \[0, 1\]"),
])
def test_accumulate_rejects_unknown_modes_and_bad_decay(kwargs, match):
    with pytest.raises(ValueError, match=match):
        accumulate(PREV, CUR, **kwargs)


def test_accumulate_rejects_a_tensor_that_changed_shape():
    with pytest.raises(ValueError, match="importance of a changed shape"):
        accumulate({"a": torch.zeros(2)}, CUR, "max")


# -- ImportanceRegulariser -------------------------------------------------------------------------

def _weights(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}


def test_penalty_is_zero_at_the_anchor_and_positive_away_from_it():
    model = tiny_model()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg = ImportanceRegulariser(_weights(model), anchor, strength=2.0)
    assert float(reg.penalty(model).detach()) == 0.0
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    assert float(reg.penalty(model).detach()) > 0.0


def test_penalty_value_and_gradient_match_the_closed_form():
    """penalty = ½·s·Σ w (θ − θ*)², so ∂penalty/∂θ = s·w·(θ − θ*)."""
    model = _linear()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = _weights(model, seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    strength = 3.0
    pen = ImportanceRegulariser(weights, anchor, strength).penalty(model)
    params = dict(model.named_parameters())
    expected = 0.5 * strength * sum((weights[n] * (params[n] - anchor[n]).pow(2)).sum() for n in params)
    torch.testing.assert_close(pen, expected.detach())
    grads = torch.autograd.grad(pen, list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(g, strength * weights[name] * (p.detach() - anchor[name]))


def test_penalty_skips_frozen_parameters_and_is_zero_at_zero_strength():
    model = _linear()
    anchor = {n: p.detach().clone() - 1.0 for n, p in model.named_parameters()}
    weights = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    assert float(ImportanceRegulariser(weights, anchor, 0.0).penalty(model).detach()) == 0.0
    for p in model.parameters():
        p.requires_grad_(False)
    assert float(ImportanceRegulariser(weights, anchor, 1.0).penalty(model).detach()) == 0.0


@pytest.mark.parametrize("weights, anchor, strength, match", [
    ({"a": torch.ones(1)}, {"a": torch.ones(1)}, -1.0, "strength must be >= 0"),
    ({"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.ones(1)}, 1.0, r"anchor lacks tensors.*'b'"),
])
def test_regulariser_rejects_negative_strength_and_a_short_anchor(weights, anchor, strength, match):
    with pytest.raises(ValueError, match=match):
        ImportanceRegulariser(weights, anchor, strength)


def test_density_is_the_share_of_weights_at_or_above_the_threshold():
    weights = {"a": torch.tensor([0.0, 0.5, 1.0, 0.2]), "b": torch.tensor([[0.9, 0.1]])}
    assert importance_density(weights) == pytest.approx(3 / 6)
    assert importance_density(weights, threshold=0.0) == 1.0
    assert importance_density(weights, threshold=0.95) == pytest.approx(1 / 6)
    assert math.isnan(importance_density({}))
