"""The evaluation of one round, as one benchmark row (also ``unlearnd unlearn --json``).

Accuracies are fractions. ``mia_auc`` is the loss-based membership AUC of the forget instances
against held-out test images (0.5: they look like data the model never saw).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from daemon.engine.evaluate import loss_auc, param_drift_l2, per_sample_loss, predict, prediction_flip_ratio
from daemon.engine.kinds import get_kind
from daemon.engine.requests import ForgetRequest

__all__ = ["ROW_FIELDS", "EvalContext", "evaluate_model"]

ROW_FIELDS = (
    "dataset", "arch", "method", "preset", "kind", "protocol", "k", "seed", "round", "accumulation",
    "acc_forget", "acc_forget_union", "acc_retain", "acc_test", "acc_test_before", "acc_test_original",
    "acc_other_classes", "mia_auc", "steps", "attack_s", "optimise_s", "wall_s", "outcome",
)


@dataclass(frozen=True)
class EvalContext:
    """The fixed data a benchmark evaluates against."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    acc_test_original: float
    mia_holdout: int = 2000


def _acc(pred: torch.Tensor, y: torch.Tensor) -> float | None:
    return None if y.numel() == 0 else float((pred == y).float().mean())


def evaluate_model(
    model: nn.Module,
    ctx: EvalContext,
    request: ForgetRequest,
    *,
    forgotten_union: torch.Tensor,
    test_pred_before: torch.Tensor,
) -> dict[str, Any]:
    """Accuracy on the forget set (its own criterion), all forgotten so far, the rest, and the test set.

    ``forgotten_union``: indices into the training set of every instance forgotten so far (this
    round included) — excluded from ``acc_retain``. The forget accuracy is on what the kind's stopping
    rule reads (``Kind.wanted``: the targets for ``relabel``); for a kind that names a class
    (``forget_class``) ``acc_forget`` is the class's test accuracy, ``acc_other_classes`` the test
    accuracy on every other class, and the class's training examples are left out of ``acc_retain``.
    """
    kind = get_kind(request.kind)
    test_pred = predict(model, ctx.test_x)
    acc_test = _acc(test_pred, ctx.test_y)
    keep = torch.ones(ctx.train_y.shape[0], dtype=torch.bool)
    keep[forgotten_union] = False
    if kind.names_class:
        c = int(request.forget_class)
        keep &= ctx.train_y != c
    train_pred = predict(model, ctx.train_x)
    acc_retain = _acc(train_pred[keep], ctx.train_y[keep])
    forget_pred = predict(model, request.x)
    acc_other = None
    if kind.names_class:
        c = int(request.forget_class)
        in_c = ctx.test_y == c
        acc_forget = _acc(test_pred[in_c], ctx.test_y[in_c])
        acc_other = _acc(test_pred[~in_c], ctx.test_y[~in_c])
        acc_union = _acc(forget_pred, request.labels)
    else:
        acc_forget = _acc(forget_pred, kind.wanted(request))
        acc_union = _acc(train_pred[forgotten_union], ctx.train_y[forgotten_union])
    member = per_sample_loss(model, request.x, request.labels)
    hold = per_sample_loss(model, ctx.test_x[:ctx.mia_holdout], ctx.test_y[:ctx.mia_holdout])
    return {
        "acc_forget": acc_forget,
        "acc_forget_union": acc_union,
        "acc_retain": acc_retain,
        "acc_test": acc_test,
        "acc_test_original": ctx.acc_test_original,
        "acc_other_classes": acc_other,
        "mia_auc": loss_auc(member, hold),
        "test_flip_ratio": prediction_flip_ratio(test_pred_before, test_pred),
    }


def drift_report(model: nn.Module, original: Mapping[str, torch.Tensor],
                 previous: Mapping[str, torch.Tensor]) -> dict[str, float]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    return {"param_drift_l2_original": param_drift_l2(params, original),
            "param_drift_l2_previous": param_drift_l2(params, previous)}
