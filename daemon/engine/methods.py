"""The unlearning methods, one interface, registered by name in one place.

A method is a forget term plus plugins. The forget term decides what the forget instances are pushed
towards (away from their labels, or towards chosen classes, with the margin loss or cross-entropy);
the plugins add what is held beside it: the held set (adversarial examples, affine anchors and class
impressions held at a model's logits: ``daemon.engine.held``) and MAS importance anchoring the weights
(``daemon.engine.importance_plugin``). Everything else — optimiser, stopping rule, step budget,
divergence checks — is the round's (``daemon.engine.rounds``), identical for every method, so their
numbers compare; only the step size is a method's own where a preset says so
(``daemon.engine.config.METHOD_SETTINGS``: the baselines at the shared step collapse the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from daemon.engine.attacks import frozen_eval
from daemon.engine.config import UnlearnConfig
from daemon.engine.evaluate import eval_mode
from daemon.engine.held import HeldSet
from daemon.engine.importance_plugin import ImportancePlugin
from daemon.engine.kinds import get_kind, label_margin
from daemon.engine.requests import ForgetRequest

__all__ = ["METHODS", "Method", "get_method", "forget_term", "label_margin"]


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


@dataclass(frozen=True)
class Method:
    """A named unlearning method: a forget term plus plugins. Subclasses set the class attributes and may
    pick forget targets."""

    name: ClassVar[str] = ""
    #: what the round adds beside the forget term: :class:`HeldSet`, :class:`ImportancePlugin`
    plugins: ClassVar[tuple[type, ...]] = ()
    #: The benchmark-only oracle needs the remaining training data and never runs in a round.
    oracle: ClassVar[bool] = False
    #: Fine-tune towards the chosen labels with cross-entropy (the relabelling baselines).
    towards_ce: ClassVar[bool] = False

    @property
    def uses_adversarial(self) -> bool:
        """Whether the round holds adversarial examples (and anchors, impressions) beside the forget term."""
        return HeldSet in self.plugins

    @property
    def uses_importance(self) -> bool:
        """Whether MAS importance anchors the weights (the round needs an :class:`ImportancePlugin`)."""
        return ImportancePlugin in self.plugins

    def towards(self, model: nn.Module, request: ForgetRequest, config: UnlearnConfig,
                generator: torch.Generator) -> torch.Tensor | None:
        """Labels the forget term pulls towards, or None to push away from the instance's label: the kind's own
        (relabel's targets), else the method's choice."""
        towards = get_kind(request.kind).towards(request)
        return towards if towards is not None else self.choose_towards(model, request, config, generator)

    def choose_towards(self, model: nn.Module, request: ForgetRequest, config: UnlearnConfig,
                       generator: torch.Generator) -> torch.Tensor | None:
        """Where the method pulls instances whose kind names no target (None: away from the label)."""
        return None

    def forget_loss(self, logits: torch.Tensor, labels: torch.Tensor, towards: torch.Tensor | None,
                    active: torch.Tensor, config: UnlearnConfig, weights: torch.Tensor | None,
                    margin: float) -> torch.Tensor:
        """The method's forget term of a step (:func:`forget_term` with the method's own loss)."""
        return forget_term(logits, labels, towards, active, config, weights, towards_ce=self.towards_ce,
                           margin=margin)


@dataclass(frozen=True)
class NegGrad(Method):
    """Gradient ascent on the forget instances alone (L2UL's "Case 1")."""

    name: ClassVar[str] = "neggrad"


@dataclass(frozen=True)
class Adv(Method):
    """Gradient ascent plus targeted adversarial examples held at their labels (L2UL's "Case 2")."""

    name: ClassVar[str] = "adv"
    plugins: ClassVar[tuple[type, ...]] = (HeldSet,)


@dataclass(frozen=True)
class AdvImp(Method):
    """L2UL's full method ("Case 3"): adversarial examples and inverted MAS importance."""

    name: ClassVar[str] = "adv_imp"
    plugins: ClassVar[tuple[type, ...]] = (HeldSet, ImportancePlugin)


@dataclass(frozen=True)
class RandomLabel(Method):
    """Fine-tune each forget instance towards a random *other* label, fixed for the round."""

    name: ClassVar[str] = "random_label"
    towards_ce: ClassVar[bool] = True

    def choose_towards(self, model: nn.Module, request: ForgetRequest, config: UnlearnConfig,
                       generator: torch.Generator) -> torch.Tensor | None:
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

    def choose_towards(self, model: nn.Module, request: ForgetRequest, config: UnlearnConfig,
                       generator: torch.Generator) -> torch.Tensor | None:
        return nearest_other_class(model, request.x, request.labels, config)


@dataclass(frozen=True)
class Retrain(Method):
    """Oracle: retrain from scratch without the forget set (benchmark only; needs the training data)."""

    name: ClassVar[str] = "retrain"
    oracle: ClassVar[bool] = True


def nearest_other_class(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                        config: UnlearnConfig) -> torch.Tensor:
    """The class an untargeted L2 step walk away from each label reaches first (or the runner-up)."""
    device = next(model.parameters()).device
    xs, ys = x.to(device), labels.to(device)
    with frozen_eval(model):
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


def _num_classes(model: nn.Module, request: ForgetRequest) -> int:
    with eval_mode(model):
        return int(model(request.x[:1].to(next(model.parameters()).device)).shape[1])


METHODS: dict[str, Method] = {m.name: m() for m in (NegGrad, Adv, AdvImp, RandomLabel, BoundaryShrink, Retrain)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]

