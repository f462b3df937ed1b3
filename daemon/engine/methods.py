"""The unlearning methods, one interface, registered by name in one place.

A method decides three things: what the forget instances are pushed towards (its forget term),
whether adversarial examples hold the decision boundary (the ``adv`` term), and whether MAS
importance anchors the weights (the ``imp`` term). Everything else — optimiser, stopping rule, step
budget, divergence checks — is the round's (``daemon.engine.rounds``), identical for every method, so
their numbers compare; only the step size is a method's own where a preset says so
(``daemon.engine.config.METHOD_SETTINGS``: the baselines at the shared step collapse the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from daemon.engine.attacks import TargetedL2PGD
from daemon.engine.config import UnlearnConfig
from daemon.engine.kinds import label_margin
from daemon.engine.requests import ForgetRequest

__all__ = ["METHODS", "Method", "get_method", "forget_term", "held_logit_term", "label_margin"]


def _margin_away(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """relu(z_y − max_{j≠y} z_j + m): zero once the label has lost by ``margin``; bounded below."""
    return F.relu(label_margin(logits, labels) + margin)


def _margin_towards(logits: torch.Tensor, targets: torch.Tensor, margin: float) -> torch.Tensor:
    """relu(max_{j≠t} z_j − z_t + m): zero once the target wins by ``margin``."""
    return F.relu(margin - label_margin(logits, targets))


def forget_term(logits: torch.Tensor, labels: torch.Tensor, towards: torch.Tensor | None,
                active: torch.Tensor, config: UnlearnConfig, weights: torch.Tensor | None = None,
                *, towards_ce: bool = False, margin: float | None = None) -> torch.Tensor:
    """The forget loss of a step, averaged over *all* instances of the round (not just the active ones).

    ``towards`` is None for pushing away from ``labels`` (misclassification), else per-instance
    targets to reach (relabel, and the relabelling baselines). ``active`` masks instances still to
    be unlearned; dividing by the full count keeps the step size from growing as they finish.
    ``weights`` are per-instance multipliers (the round's dual variables, see ``forget_boost``).
    ``towards_ce``: fine-tune with cross-entropy to ``towards`` whatever ``forget_loss`` says (the
    relabelling baselines are defined that way). ``margin`` overrides ``config.forget_margin``.
    """
    n = logits.shape[0]
    m = config.forget_margin if margin is None else margin
    if towards is None:
        if config.forget_loss == "neg_ce":
            per = -F.cross_entropy(logits, labels, reduction="none")
        else:
            per = _margin_away(logits, labels, m)
    elif config.forget_loss == "neg_ce" or towards_ce:   # the paper's relabel variant: +CE to the new label
        per = F.cross_entropy(logits, towards, reduction="none")
    else:
        per = _margin_towards(logits, towards, m)
    mask = active.to(per.dtype)
    if weights is not None:
        mask = mask * weights
    return (per * mask).sum() / n


def held_logit_term(logits: torch.Tensor, held: torch.Tensor, forget_class: int | None = None) -> torch.Tensor:
    """Squared distance of the held examples' logits from where the round found them (mean over examples).

    In a class round the held examples lie around the class being forgotten, so they may *lose* its
    logit but never gain it: pulling that logit back up where it fell would hold the class in place
    (measured on MNIST: 23% of class 8 left with the two-sided term, 0.1% one-sided; mnist_notes.md).
    """
    diff = logits - held
    if forget_class is not None:
        keep = torch.ones_like(diff, dtype=torch.bool)
        keep[:, forget_class] = diff[:, forget_class] > 0
        diff = diff * keep
    return diff.pow(2).sum(1).mean()


@dataclass(frozen=True)
class Method:
    """A named unlearning method. Subclasses set the class flags and may pick forget targets."""

    name: ClassVar[str] = ""
    uses_adversarial: ClassVar[bool] = False
    uses_importance: ClassVar[bool] = False
    #: The benchmark-only oracle needs the remaining training data and never runs in a round.
    oracle: ClassVar[bool] = False
    #: Fine-tune towards the chosen labels with cross-entropy (the relabelling baselines).
    towards_ce: ClassVar[bool] = False

    def towards(self, model: nn.Module, request: ForgetRequest, config: UnlearnConfig,
                generator: torch.Generator) -> torch.Tensor | None:
        """Labels the forget term pulls towards, or None to push away from the instance's label."""
        if request.kind == "relabel":
            return request.targets
        return None


@dataclass(frozen=True)
class NegGrad(Method):
    """Gradient ascent on the forget instances alone (L2UL's "Case 1")."""

    name: ClassVar[str] = "neggrad"


@dataclass(frozen=True)
class Adv(Method):
    """Gradient ascent plus targeted adversarial examples held at their labels (L2UL's "Case 2")."""

    name: ClassVar[str] = "adv"
    uses_adversarial: ClassVar[bool] = True


@dataclass(frozen=True)
class AdvImp(Method):
    """L2UL's full method ("Case 3"): adversarial examples and inverted MAS importance."""

    name: ClassVar[str] = "adv_imp"
    uses_adversarial: ClassVar[bool] = True
    uses_importance: ClassVar[bool] = True


@dataclass(frozen=True)
class RandomLabel(Method):
    """Fine-tune each forget instance towards a random *other* label, fixed for the round."""

    name: ClassVar[str] = "random_label"
    towards_ce: ClassVar[bool] = True

    def towards(self, model: nn.Module, request: ForgetRequest, config: UnlearnConfig,
                generator: torch.Generator) -> torch.Tensor | None:
        if request.kind == "relabel":
            return request.targets
        num_classes = _num_classes(model, request)
        offset = torch.randint(1, num_classes, request.labels.shape, generator=generator)
        return (request.labels.cpu() + offset) % num_classes


@dataclass(frozen=True)
class BoundaryShrink(Method):
    """Boundary Shrink (Chen et al., CVPR 2023): relabel each instance to its nearest adversarial class.

    The nearest class is the one an *untargeted* L2 attack of the same budget lands in (Chen et al.
    use FGSM-style neighbour search; L2 PGD in the same ball finds the same kind of neighbour).
    """

    name: ClassVar[str] = "boundary_shrink"
    towards_ce: ClassVar[bool] = True

    def towards(self, model: nn.Module, request: ForgetRequest, config: UnlearnConfig,
                generator: torch.Generator) -> torch.Tensor | None:
        if request.kind == "relabel":
            return request.targets
        return nearest_other_class(model, request.x, request.labels, config)


@dataclass(frozen=True)
class Retrain(Method):
    """Oracle: retrain from scratch without the forget set (benchmark only; needs the training data)."""

    name: ClassVar[str] = "retrain"
    oracle: ClassVar[bool] = True


def nearest_other_class(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                        config: UnlearnConfig) -> torch.Tensor:
    """The class an untargeted L2 step walk away from each label reaches first (or the runner-up)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    xs, ys = x.to(device), labels.to(device)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        x_adv = xs.clone()
        for _ in range(config.pgd_iterations):
            xa = x_adv.clone().requires_grad_(True)
            out = model(xa)
            if bool((out.argmax(1) != ys).all()):
                break
            loss = F.cross_entropy(out, ys, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xa)
            gnorm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            with torch.no_grad():
                delta = (xa + config.pgd_step * grad / gnorm).clamp(0, 1) - xs
                norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                x_adv = (xs + delta * torch.clamp(config.pgd_eps / norms, max=1.0)).clamp(0, 1)
        with torch.no_grad():
            out = model(x_adv)
            out = out.scatter(1, ys.view(-1, 1), float("-inf"))   # never the label itself
            return out.argmax(1).cpu()
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def _num_classes(model: nn.Module, request: ForgetRequest) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        n = int(model(request.x[:1].to(next(model.parameters()).device)).shape[1])
    model.train(was_training)
    return n


METHODS: dict[str, Method] = {m.name: m() for m in (NegGrad, Adv, AdvImp, RandomLabel, BoundaryShrink, Retrain)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def make_attack(model: nn.Module, config: UnlearnConfig) -> TargetedL2PGD:
    return TargetedL2PGD(model, eps=config.pgd_eps, step=config.pgd_step, iterations=config.pgd_iterations,
                         early_exit=config.pgd_early_exit, batch_size=config.attack_batch)
