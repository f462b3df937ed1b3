"""The round's plugins on their own: the held set (daemon.engine.held) and the importance plugin
(daemon.engine.importance_plugin), and the shared attack mode (attacks.frozen_eval)."""

from __future__ import annotations

import pytest
import torch

from daemon.engine.attacks import frozen_eval
from daemon.engine.held import HeldSet
from daemon.engine.importance import anchor_weights, mas_importance
from daemon.engine.importance_plugin import ImportancePlugin
from daemon.engine.kinds import get_kind
from daemon.engine.methods import METHODS
from daemon.engine.requests import ForgetRequest
from tests.engine_fixtures import NUM_CLASSES, fast_config, forget_set, state_equal, tiny_model, train_data


# -- the importance plugin ---------------------------------------------------------------------------
def _moved(model: torch.nn.Module, by: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)
    return model


def test_the_plugin_holds_no_importance_before_its_first_consolidation():
    plugin = ImportancePlugin("max")
    assert plugin.weights is None
    weights = plugin.round_weights(tiny_model(), forget_set(4)[0])
    assert plugin.weights is None              # estimating a round's weights leaves the plugin as it was
    plugin.consolidate(weights)
    assert state_equal(plugin.weights, weights)


def test_the_penalty_is_zero_where_the_round_starts_and_positive_once_the_weights_move():
    model = tiny_model()
    plugin = ImportancePlugin("none")
    regulariser = plugin.regulariser(plugin.round_weights(model, forget_set(4)[0]), model, strength=1.0)
    assert float(regulariser.penalty(model).detach()) == 0.0
    assert float(regulariser.penalty(_moved(model)).detach()) > 0.0


def test_a_first_round_weighs_what_mas_gives_and_max_never_lowers_a_weight():
    model, x = tiny_model(), forget_set(4)[0]
    plugin = ImportancePlugin("max")
    first = plugin.round_weights(model, x)
    assert state_equal(first, anchor_weights(mas_importance(model, x)))
    plugin.consolidate(first)
    second = plugin.round_weights(_moved(tiny_model()), forget_set(4, 8)[0])
    assert all(bool((second[n] >= first[n]).all()) for n in first)


def test_an_unknown_accumulation_is_refused_when_made_and_when_changed():
    with pytest.raises(ValueError, match="unknown accumulation 'mean'"):
        ImportancePlugin("mean")
    plugin = ImportancePlugin()
    with pytest.raises(ValueError, match="unknown accumulation 'mean'"):
        plugin.accumulation = "mean"
    assert plugin.accumulation == "max"


def test_methods_are_a_forget_term_plus_plugins():
    assert METHODS["adv_imp"].plugins == (HeldSet, ImportancePlugin)
    assert METHODS["adv"].uses_adversarial and not METHODS["adv"].uses_importance
    assert not any(METHODS[m].plugins for m in ("neggrad", "random_label", "boundary_shrink"))


# -- the held set ------------------------------------------------------------------------------------
def _prepare(request: ForgetRequest, generator: torch.Generator, *, satisfied: bool = False, reference=None,
             **overrides) -> HeldSet:
    return HeldSet.prepare(tiny_model(), request, get_kind(request.kind), fast_config(**overrides),
                           generator=generator, num_classes=NUM_CLASSES, reference=reference, should_abort=None,
                           satisfied=satisfied)


def test_a_held_set_with_nothing_to_hold_adds_no_term():
    held = HeldSet(fast_config())
    assert held.loss(tiny_model(), 1) is None
    assert held.size == held.adversarial == held.anchors == 0 and held.sentinel() is None
    assert held.fallback_step is None


def test_a_held_set_with_no_budget_draws_nothing_and_holds_nothing():
    x, y = forget_set(4)
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state().clone()
    held = _prepare(ForgetRequest("forget", x, y), gen, adv_per_instance=0, anchor_deform=0, held_impressions=0)
    assert held.size == 0 and held.loss(tiny_model(), 1) is None
    assert torch.equal(gen.get_state(), before)


def test_a_satisfied_request_prepares_nothing():
    x, y = forget_set(4)
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state().clone()
    held = _prepare(ForgetRequest("forget", x, y), gen, satisfied=True, held_impressions=4)
    assert held.size == 0 and torch.equal(gen.get_state(), before)


def test_adversarial_examples_come_first_then_anchors_then_impressions():
    x, y = forget_set(4)
    held = _prepare(ForgetRequest("forget", x, y), torch.Generator().manual_seed(0), adv_per_instance=2,
                    anchor_deform=3, held_impressions=5)
    assert (held.adversarial, held.anchors, held.size) == (8, 12 + 5, 25)
    assert held.sentinel().shape == (25, *x.shape[1:])
    loss, batch = held.loss(tiny_model(), 1)
    assert batch == fast_config().adv_batch and float(loss.detach()) == 0.0   # held where the model found them


def test_a_class_round_holds_only_adversarial_examples():
    tx, ty = train_data()
    xs = tx[ty == 1][:4]
    held = _prepare(ForgetRequest("forget_class", xs, torch.full((4,), 1), forget_class=1),
                    torch.Generator().manual_seed(0), anchor_deform=3, held_impressions=5)
    assert held.anchors == 0 and held.size == held.adversarial > 0


def test_the_held_set_falls_back_to_the_models_own_logits_after_its_share_of_the_budget():
    x, y = forget_set(4)
    reference = _moved(tiny_model(), 0.01).eval()
    held = _prepare(ForgetRequest("forget", x, y), torch.Generator().manual_seed(0), reference=reference,
                    max_steps=10, hold_original_share=0.3)
    model = tiny_model()
    for step in range(1, 4):
        held.loss(model, step)
    assert held.fallback_step is None
    held.loss(model, 4)
    assert held.fallback_step == 3 and torch.equal(held.kept, held.own)


# -- the attack mode -----------------------------------------------------------------------------------
def test_frozen_eval_restores_mode_and_gradient_flags_even_on_error():
    model = tiny_model().train()
    first = next(model.parameters())
    first.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError):
        with frozen_eval(model):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("inside")
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
