"""AMUN as a benchmark method (issue 22, part 4): the nearest adversarial example, and the fine-tuning on it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from daemon.bench.amun import AmunSettings, amun_unlearn, nearest_adversarial


def toy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny classifier (with BatchNorm) fitted to images whose class is their mean brightness above 0.5."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 1, 4, 4, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    return model, x, y


def test_the_nearest_adversarial_example_flips_each_prediction_at_the_smallest_radius_that_does():
    model, x, y = toy()
    xs, ys = x[:40], y[:40]
    adv, pred, radius = nearest_adversarial(model, xs, ys, AmunSettings(eps_schedule=(0.1, 0.2, 0.4, 0.8, 1.6, 3.2)))
    flipped = torch.isfinite(radius)
    assert flipped.all(), radius
    assert (pred != ys).all() and (model(adv).argmax(1) == pred).all()      # labelled with the model's own belief
    dist = (adv - xs).flatten(1).norm(dim=1)
    assert (dist <= radius + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1
    margin = (xs.mean((1, 2, 3)) - 0.5).abs()                 # distance to the true boundary, in brightness
    near, far = margin.argsort()[:8], margin.argsort()[-8:]
    assert radius[near].mean() < radius[far].mean()           # the nearer the boundary, the smaller the radius
    assert all(any(math.isclose(r, e, rel_tol=1e-6) for e in (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)) for r in radius.tolist())


def test_an_instance_no_radius_flips_keeps_its_label_and_the_largest_radius():
    model, x, y = toy()
    adv, pred, radius = nearest_adversarial(model, x[:8], y[:8], AmunSettings(eps_schedule=(1e-4,), pgd_steps=3))
    assert math.isinf(radius.max()) and (pred == model(x[:8]).argmax(1)).all()
    assert ((adv - x[:8]).flatten(1).norm(dim=1) <= 1e-4 + 1e-6).all()


def test_amun_lowers_the_forget_sets_confidence_keeps_batchnorm_statistics_and_counts_its_steps():
    model, x, y = toy()
    forget, labels = x[:24], y[:24]
    before = model(forget).softmax(1).gather(1, labels[:, None]).mean().item()
    stats = [b.clone() for b in model[2].buffers()]
    s = AmunSettings(lr=0.05, epochs=2, batch_size=16, eps_schedule=(0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
    result = amun_unlearn(model, forget, labels, s, generator=torch.Generator().manual_seed(1))
    assert result.steps == 2 * math.ceil(48 / 16)             # forget set + one adversarial example each
    assert not model.training
    after = model(forget).softmax(1).gather(1, labels[:, None]).mean().item()
    assert after < before - 0.03, (before, after)
    assert all(torch.equal(a, b) for a, b in zip(stats, model[2].buffers()))
    rest = x[200:]
    assert (model(rest).argmax(1) == y[200:]).float().mean() > 0.9      # the rest of the data keeps its labels


def test_advonly_fits_the_adversarial_examples_alone():
    model, x, y = toy()
    s = AmunSettings(epochs=2, batch_size=8, with_forget_set=False, eps_schedule=(0.2, 0.4, 0.8, 1.6, 3.2))
    result = amun_unlearn(model, x[:16], y[:16], s)
    assert result.steps == 2 * math.ceil(16 / 8)


def test_a_search_made_once_is_reused_and_gives_the_same_result():
    model, x, y = toy()
    s = AmunSettings(lr=0.05, epochs=2, batch_size=16, eps_schedule=(0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
    adversarial = nearest_adversarial(model, x[:24], y[:24], s)
    twin, _, _ = toy()
    a = amun_unlearn(model, x[:24], y[:24], s, generator=torch.Generator().manual_seed(3))
    b = amun_unlearn(twin, x[:24], y[:24], s, generator=torch.Generator().manual_seed(3), adversarial=adversarial)
    assert torch.equal(a.adv_x, b.adv_x) and torch.equal(a.adv_labels, b.adv_labels)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
