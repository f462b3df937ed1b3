"""Targeted L2 PGD in [0, 1] pixel space, the attack of L2UL (advertorch's ``L2PGDAttack``, targeted).

The adversarial examples it makes are the paper's retain proxies: points within ``eps`` of a forget
instance that the model assigns to another class. Cost dominates a round, so the attack batches all
examples of a round, and each example stops costing compute as soon as it reaches its target
(median 15 of 100 iterations on MNIST): finished rows leave the active batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttackAborted", "AttackResult", "TargetedL2PGD", "frozen_eval", "other_class_targets"]


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, and no parameter tracking gradients, for the block; both restored afterwards.

    An attack differentiates with respect to its inputs only: BatchNorm uses running statistics, and no
    gradient is kept for weights the caller may be training.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


class AttackAborted(Exception):
    """The caller asked the attack to stop (its ``should_abort`` returned True)."""


def other_class_targets(labels: torch.Tensor, num_classes: int, per_instance: int,
                        generator: torch.Generator) -> torch.Tensor:
    """``per_instance`` targets per label, uniform over the *other* classes (never the label itself).

    The official code resamples a clash to ``C // 2``, so instances of class ``C // 2`` sometimes get
    their own label as target (method.md P2); drawing an offset in ``1..C-1`` avoids that exactly.
    """
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if per_instance < 1:
        raise ValueError(f"per_instance must be >= 1, got {per_instance}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    rep = labels.cpu().repeat_interleave(per_instance)
    offset = torch.randint(1, num_classes, rep.shape, generator=generator)
    return (rep + offset) % num_classes


@dataclass(frozen=True)
class AttackResult:
    """Adversarial images, their targets, and what they cost."""

    x: torch.Tensor
    targets: torch.Tensor
    reached: torch.Tensor          # bool per example: predicted as its target at the end
    iterations: torch.Tensor       # int per example: iterations it was run for
    max_iterations: int

    @property
    def success_rate(self) -> float:
        return float(self.reached.float().mean()) if self.reached.numel() else float("nan")

    @property
    def example_iterations(self) -> int:
        return int(self.iterations.sum())


class TargetedL2PGD:
    """Targeted L2 PGD with random start, projected onto the ``eps`` ball and clipped to [0, 1].

    Arguments:
        model: classifier taking [0, 1] inputs (normalisation inside), returning logits.
        eps: radius of the L2 ball (paper: 4.0).
        step: L2 length of each step (paper: 0.1).
        iterations: maximum iterations (paper: 100).
        rand_init: start from (U[0,1] − x) projected onto the ball, as advertorch does.
        early_exit: stop each example once it is classified as its target (plus ``margin``).
        margin: logit margin by which the target must win before an example counts as done.
        batch_size: examples attacked together.

    Shape:
        x: N×C×H×W in [0, 1]; targets: N (int64). Returns images of the same shape in [0, 1].

    The model is switched to eval mode (BatchNorm uses running statistics) and its parameters stop
    tracking gradients for the duration; both are restored afterwards (:func:`frozen_eval`).
    """

    def __init__(self, model: nn.Module, *, eps: float = 4.0, step: float = 0.1, iterations: int = 100,
                 rand_init: bool = True, early_exit: bool = True, margin: float = 0.0,
                 batch_size: int = 1024) -> None:
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if step <= 0:
            raise ValueError(f"step must be > 0, got {step}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.model = model
        self.eps = eps
        self.step = step
        self.iterations = iterations
        self.rand_init = rand_init
        self.early_exit = early_exit
        self.margin = margin
        self.batch_size = batch_size

    def __call__(self, x: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
                 should_abort: Callable[[], bool] | None = None) -> AttackResult:
        """Attack every image towards its target; ``should_abort`` is polled every iteration
        (raising :class:`AttackAborted`), so a daemon shutting down is not held up by a long attack."""
        if x.dim() != 4:
            raise ValueError(f"x must be N×C×H×W, got shape {tuple(x.shape)}")
        if targets.shape != (x.shape[0],):
            raise ValueError(f"need one target per image, got {tuple(targets.shape)} for {x.shape[0]} images")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise ValueError("x must lie in [0, 1]")
        with frozen_eval(self.model):
            outs = [self.forward(x[i:i + self.batch_size], targets[i:i + self.batch_size], generator, should_abort)
                    for i in range(0, x.shape[0], self.batch_size)]
        if not outs:
            empty = torch.empty(0, dtype=torch.int64)
            return AttackResult(x.clone(), targets.clone(), empty.bool(), empty, self.iterations)
        return AttackResult(
            x=torch.cat([o[0] for o in outs]),
            targets=targets.cpu().clone(),
            reached=torch.cat([o[1] for o in outs]),
            iterations=torch.cat([o[2] for o in outs]),
            max_iterations=self.iterations,
        )

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (delta.dim() - 1)))
        return delta * torch.clamp(self.eps / norms, max=1.0)

    def _done(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        target_logit = logits.gather(1, t.view(-1, 1)).squeeze(1)
        others = logits.scatter(1, t.view(-1, 1), float("-inf")).amax(1)
        return target_logit - others > self.margin

    def forward(self, x: torch.Tensor, t: torch.Tensor, generator: torch.Generator,
                should_abort: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The maths for one batch: returns (adversarial x, reached, iterations), all on the CPU."""
        device = next(self.model.parameters()).device
        x0 = x.to(device)
        t = t.to(device)
        if self.rand_init:
            noise = torch.rand(x0.shape, generator=generator).to(device)
            delta = self._project(noise - x0)
            x_adv = (x0 + delta).clamp(0, 1)
        else:
            x_adv = x0.clone()
        iters = torch.zeros(x0.shape[0], dtype=torch.int64, device=device)
        active = torch.arange(x0.shape[0], device=device)
        for it in range(self.iterations + 1):
            if should_abort is not None and should_abort():
                raise AttackAborted("the attack was aborted")
            xa = x_adv[active].clone().requires_grad_(True)
            logits = self.model(xa)
            if self.early_exit:
                # Judge each row on the logits this forward already computed: no extra pass.
                keep = ~self._done(logits.detach(), t[active])
                if not bool(keep.all()):
                    active, xa_rows = active[keep], keep
                else:
                    xa_rows = None
            else:
                xa_rows = None
            if it == self.iterations or active.numel() == 0:
                break
            loss = F.cross_entropy(logits if xa_rows is None else logits[xa_rows],
                                   t[active], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xa)
            if xa_rows is not None:
                grad, xa = grad[xa_rows], xa[xa_rows]
            gnorm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
            with torch.no_grad():
                step = xa - self.step * grad / gnorm            # targeted: descend the target's loss
                step = x0[active] + self._project(step.clamp(0, 1) - x0[active])
                x_adv[active] = step.clamp(0, 1)
                iters[active] += 1
        with torch.no_grad():
            reached = self.model(x_adv).argmax(1) == t
        return x_adv.detach().cpu(), reached.cpu(), iters.cpu()
