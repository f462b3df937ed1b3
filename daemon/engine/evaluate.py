"""Measurements of a model: accuracy, drift, prediction flips and a loss-based membership score.

All of them run in eval mode and leave the model in the mode they found it, so they can be called
between optimiser steps of a round without disturbing it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "accuracy",
    "eval_mode",
    "loss_auc",
    "param_drift_l2",
    "per_sample_loss",
    "predict",
    "prediction_flip_ratio",
]

EVAL_BATCH = 2048


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd for the block; the caller's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Arg-max predictions (int64, on the CPU)."""
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64)
    dev = _device(model)
    with eval_mode(model):
        return torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, x.shape[0], batch_size)])


def logits(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    dev = _device(model)
    with eval_mode(model):
        return torch.cat([model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, x.shape[0], batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH) -> float:
    """Top-1 accuracy as a fraction; NaN for an empty set (there is nothing to be right about)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"need as many labels as images, got {x.shape[0]} images and {y.shape[0]} labels")
    if x.shape[0] == 0:
        return float("nan")
    return float((predict(model, x, batch_size) == y.cpu()).float().mean())


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example against its label (the membership-inference signal)."""
    return F.cross_entropy(logits(model, x), y.cpu(), reduction="none")


def loss_auc(member_loss: torch.Tensor, nonmember_loss: torch.Tensor) -> float:
    """AUC of telling ``member`` from ``nonmember`` examples by low loss (0.5: indistinguishable).

    This is the Mann–Whitney statistic: the chance that a random member has a lower loss than a
    random non-member (ties count half). After unlearning, the forgotten instances should look like
    held-out data: an AUC far above 0.5 means they are still remembered, far below means they were
    over-unlearned and stand out the other way.
    """
    m = member_loss.double().flatten()
    n = nonmember_loss.double().flatten()
    if m.numel() == 0 or n.numel() == 0:
        return float("nan")
    allv = torch.cat([m, n])
    order = allv.argsort()
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, allv.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse, counts = torch.unique(allv, return_inverse=True, return_counts=True)
    if counts.max() > 1:
        sums = torch.zeros_like(uniq).scatter_add_(0, inverse, ranks)
        ranks = (sums / counts.double())[inverse]
    # rank of non-members among all, high loss = high rank; AUC that a member has lower loss
    r_n = ranks[m.numel():].sum()
    u = r_n - n.numel() * (n.numel() + 1) / 2
    return float(u / (m.numel() * n.numel()))


def param_drift_l2(params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """‖θ − θ_ref‖₂ over the floating-point tensors both share."""
    total = torch.zeros((), dtype=torch.float64)
    for name, ref in reference.items():
        cur = params.get(name)
        if cur is None or not torch.is_floating_point(ref):
            continue
        total += (cur.detach().double().cpu() - ref.detach().double().cpu()).pow(2).sum()
    return float(total.sqrt())


def prediction_flip_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    """Share of examples whose predicted class changed."""
    if before.shape != after.shape:
        raise ValueError(f"prediction tensors differ in shape: {tuple(before.shape)} vs {tuple(after.shape)}")
    if before.numel() == 0:
        return float("nan")
    return float((before != after).float().mean())
