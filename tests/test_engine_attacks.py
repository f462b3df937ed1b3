"""daemon.engine.attacks: targeted L2 PGD (success, eps ball, [0, 1], early exit, side effects) and its targets."""

from __future__ import annotations

import pytest
import torch

from daemon.engine.attacks import TargetedL2PGD, other_class_targets
from tests.engine_fixtures import NUM_CLASSES, tiny_model, train_data

EPS = 2.0


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = train_data()
    targets = other_class_targets(y[:n], NUM_CLASSES, 1, torch.Generator().manual_seed(0))
    return x[:n], targets


def _attack(model, **kw) -> TargetedL2PGD:
    args = dict(eps=EPS, step=0.25, iterations=20)
    args.update(kw)
    return TargetedL2PGD(model, **args)


def test_attack_reaches_its_targets_inside_the_eps_ball_and_the_pixel_range():
    model = tiny_model()
    x, t = _batch()
    res = _attack(model)(x, t, torch.Generator().manual_seed(0))
    assert res.x.shape == x.shape
    assert torch.equal(res.targets, t)
    assert res.success_rate >= 0.9
    # reached is what the model says about the returned images
    with torch.no_grad():
        assert torch.equal(res.reached, model(res.x).argmax(1) == t)
    assert float((res.x - x).flatten(1).norm(dim=1).max()) <= EPS + 1e-5
    assert float(res.x.min()) >= 0.0 and float(res.x.max()) <= 1.0
    assert int(res.iterations.max()) <= res.max_iterations == 20


def test_a_small_eps_ball_is_respected_even_when_targets_are_out_of_reach():
    model = tiny_model()
    x, t = _batch()
    res = _attack(model, eps=0.3)(x, t, torch.Generator().manual_seed(0))
    assert float((res.x - x).flatten(1).norm(dim=1).max()) <= 0.3 + 1e-5
    assert float(res.x.min()) >= 0.0 and float(res.x.max()) <= 1.0
    assert res.success_rate < 1.0          # the budget is too small for some: they run to the end
    assert int(res.iterations[~res.reached].min()) == 20


def test_early_exit_spends_fewer_example_iterations_at_the_same_success_rate():
    model = tiny_model()
    x, t = _batch()
    early = _attack(model, early_exit=True)(x, t, torch.Generator().manual_seed(0))
    full = _attack(model, early_exit=False)(x, t, torch.Generator().manual_seed(0))
    assert full.example_iterations == x.shape[0] * 20
    assert bool((full.iterations == 20).all())
    assert early.success_rate == full.success_rate == 1.0
    assert early.example_iterations < full.example_iterations
    assert float((early.x - x).flatten(1).norm(dim=1).max()) <= EPS + 1e-5


@pytest.mark.parametrize("start_training", [True, False])
def test_attack_restores_mode_and_requires_grad_and_leaves_no_parameter_grads(start_training):
    model = tiny_model()
    model.train(start_training)
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x, t = _batch(8)
    _attack(model)(x, t, torch.Generator().manual_seed(0))
    assert model.training is start_training
    assert all(m.training is start_training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_same_generator_seed_gives_identical_adversarial_images():
    model = tiny_model()
    x, t = _batch(8)
    a = _attack(model)(x, t, torch.Generator().manual_seed(7))
    b = _attack(model)(x, t, torch.Generator().manual_seed(7))
    assert torch.equal(a.x, b.x) and torch.equal(a.iterations, b.iterations)


def test_batching_covers_every_example_once():
    model = tiny_model()
    x, t = _batch(11)
    res = _attack(model, batch_size=4)(x, t, torch.Generator().manual_seed(0))
    assert res.x.shape == x.shape and res.reached.shape == (11,) and res.iterations.shape == (11,)
    assert float((res.x - x).flatten(1).norm(dim=1).max()) <= EPS + 1e-5


def test_an_empty_batch_gives_an_empty_result():
    res = _attack(tiny_model())(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.int64),
                                torch.Generator().manual_seed(0))
    assert res.x.shape == (0, 1, 8, 8) and res.example_iterations == 0
    assert res.success_rate != res.success_rate      # NaN: nothing to succeed at


@pytest.mark.parametrize("num_classes", [4, 10])
@pytest.mark.parametrize("which", ["zero", "middle", "last"])
def test_other_class_targets_never_return_the_label_and_cover_every_other_class(num_classes, which):
    """Includes the label C // 2 that the official code's resampling hands its own label (P2)."""
    label = {"zero": 0, "middle": num_classes // 2, "last": num_classes - 1}[which]
    labels = torch.full((5,), label, dtype=torch.int64)
    out = other_class_targets(labels, num_classes, 60, torch.Generator().manual_seed(0))
    assert out.shape == (300,) and out.dtype == torch.int64
    assert not bool((out == label).any())
    assert set(out.tolist()) == set(range(num_classes)) - {label}


def test_other_class_targets_are_grouped_per_instance_in_label_order():
    labels = torch.tensor([0, 1, 2, 3])
    out = other_class_targets(labels, 4, 3, torch.Generator().manual_seed(0))
    assert out.shape == (12,)
    assert not bool((out.view(4, 3) == labels.view(4, 1)).any())


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=1, per_instance=1), "at least 2 classes"),
    (dict(num_classes=4, per_instance=0), "per_instance must be >= 1"),
    (dict(num_classes=2, per_instance=1), r"labels must lie in \[0, 1\]"),
])
def test_other_class_targets_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        other_class_targets(torch.tensor([0, 3]), generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=-1.0), "eps must be > 0"),
    (dict(step=0.0), "step must be > 0"),
    (dict(iterations=0), "iterations must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(margin=-0.1), "margin must be >= 0"),
])
def test_attack_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TargetedL2PGD(tiny_model(), **kwargs)


@pytest.mark.parametrize("x, targets, match", [
    (torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.int64), "one target per image"),
    (torch.rand(4, 1, 8, 8), torch.zeros(4, 1, dtype=torch.int64), "one target per image"),
    (torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.int64), "N×C×H×W"),
    (torch.rand(4, 1, 8, 8) + 1.0, torch.zeros(4, dtype=torch.int64), r"x must lie in \[0, 1\]"),
    (torch.rand(4, 1, 8, 8) - 1.0, torch.zeros(4, dtype=torch.int64), r"x must lie in \[0, 1\]"),
])
def test_attack_rejects_bad_inputs(x, targets, match):
    with pytest.raises(ValueError, match=match):
        _attack(tiny_model())(x, targets, torch.Generator().manual_seed(0))
