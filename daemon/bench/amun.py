"""AMUN (Ebrahimpour-Boroojeny et al., ICML 2025), the strongest retain-free peer, as a benchmark method (issue 22).

For each forget instance AMUN finds its nearest adversarial example (untargeted L2 PGD at the smallest radius, from
a doubling schedule, at which the prediction changes) and labels it with the model's own prediction there; it then
fine-tunes on those adversarial examples together with the forget instances at their training labels (the paper's
setting without the remaining data; its ``advonly`` ablation drops the forget instances). The adversarial examples
are already the model's "beliefs", so fitting them moves the boundary only near each forget instance and lowers
the confidence there, which is what a retrained model shows on data it never saw.

It is a benchmark row, not a daemon method: the daemon's rounds share one loop, stopping rule and budget
(:mod:`daemon.engine.rounds`), while AMUN is defined by a fixed number of fine-tuning epochs. BatchNorm (and
dropout) stay in eval mode, as in every round of the engine: a few dozen images must not rewrite running statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from daemon.engine.attacks import frozen_eval
from daemon.engine.kinds import label_margin

__all__ = ["AmunResult", "AmunSettings", "amun_unlearn", "nearest_adversarial"]


@dataclass(frozen=True)
class AmunSettings:
    """AMUN's knobs. The official code's defaults are SGD, lr 0.01, 10 epochs, batch 128, PGD-L2 with 50 steps;
    the radius schedule here starts at 0.25 (MNIST pixels in [0, 1]) and doubles."""

    lr: float = 0.01
    epochs: int = 10
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    pgd_steps: int = 50
    eps_schedule: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    with_forget_set: bool = True        # False: the paper's "advonly" (adversarial examples alone)


@dataclass(frozen=True)
class AmunResult:
    adv_x: torch.Tensor
    adv_labels: torch.Tensor
    radius: torch.Tensor                # the schedule's radius that flipped each instance (inf: none did)
    steps: int                          # optimiser steps taken
    attack_s: float
    finetune_s: float


def _pgd_l2_untargeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """Untargeted L2 PGD from the clean image (no random start: the nearest example is wanted), step 2.5·eps/steps.

    It ascends the logit margin (best other class minus the label) rather than the cross-entropy, whose gradient
    underflows to zero on an instance the model is certain of (a memorised one: exactly the ones to forget)."""
    step = 2.5 * eps / steps
    x_adv = x.clone()
    for _ in range(steps):
        xa = x_adv.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(-label_margin(model(xa), y).sum(), xa)
        gnorm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        with torch.no_grad():
            delta = (xa + step * grad / gnorm).clamp(0, 1) - x
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x_adv = (x + delta * torch.clamp(eps / norms, max=1.0)).clamp(0, 1)
    return x_adv


def nearest_adversarial(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                        settings: AmunSettings = AmunSettings()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(adversarial images, the model's predictions on them, the radius used) per instance.

    Each instance is attacked at the schedule's radii in turn and keeps the first that changes its prediction;
    one that never changes keeps the largest radius's image and the model's prediction there (its label, then:
    it is then simply fitted again, as the official code does with whatever its search returns)."""
    device = next(model.parameters()).device
    xs, ys = x.to(device), labels.to(device)
    adv = xs.clone()
    radius = torch.full((xs.shape[0],), float("inf"), device=device)
    with frozen_eval(model):
        todo = torch.arange(xs.shape[0], device=device)
        for eps in settings.eps_schedule:
            if todo.numel() == 0:
                break
            cand = _pgd_l2_untargeted(model, xs[todo], ys[todo], eps, settings.pgd_steps)
            with torch.no_grad():
                flipped = model(cand).argmax(1) != ys[todo]
            adv[todo] = cand                          # the last radius's image stays for the unflipped ones
            radius[todo[flipped]] = eps
            todo = todo[~flipped]
        with torch.no_grad():
            pred = model(adv).argmax(1)
    return adv.cpu(), pred.cpu(), radius.cpu()


def amun_unlearn(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, settings: AmunSettings = AmunSettings(),
                 *, generator: torch.Generator | None = None,
                 adversarial: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> AmunResult:
    """Unlearn ``x`` (at its training ``labels``) from ``model`` in place, AMUN's way, without the remaining data.

    ``adversarial``: :func:`nearest_adversarial`'s result for this model and these instances, when already made
    (a benchmark tuning the fine-tuning reuses one search; ``attack_s`` is then 0)."""
    t0 = time.perf_counter()
    adv_x, adv_y, radius = adversarial if adversarial is not None else nearest_adversarial(model, x, labels, settings)
    attack_s = time.perf_counter() - t0
    data_x = torch.cat([x.cpu(), adv_x]) if settings.with_forget_set else adv_x
    data_y = torch.cat([labels.cpu(), adv_y]) if settings.with_forget_set else adv_y
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training, steps = model.training, 0
    model.eval()                                  # BatchNorm's running statistics are never updated
    t1 = time.perf_counter()
    try:
        for _ in range(settings.epochs):
            order = torch.randperm(data_x.shape[0], generator=gen)
            for i in range(0, order.numel(), settings.batch_size):
                b = order[i:i + settings.batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(data_x[b].to(device)), data_y[b].to(device)).backward()
                opt.step()
                steps += 1
    finally:
        model.train(was_training)
    return AmunResult(adv_x, adv_y, radius, steps, attack_s, time.perf_counter() - t1)
