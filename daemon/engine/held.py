"""What a round holds beside its forget term: one plugin, the held set.

The held set is the data-free stand-in for the data a round must not change: targeted adversarial
examples around every instance (L2UL's retain proxies, ``daemon.engine.attacks``), small affine copies
of the instances (``daemon.engine.anchors``) and class impressions of the model, each held at the
logits a model gives it (the reference's, falling back to the model's own: ``hold_original_share``).
A method that holds (``adv``, ``adv_imp``) gets it from :meth:`HeldSet.prepare`; each step then asks
it for its term (:meth:`HeldSet.loss`), and a set with nothing to hold adds no term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from daemon.engine.anchors import deformations
from daemon.engine.attacks import AttackAborted, TargetedL2PGD, other_class_targets
from daemon.engine.config import UnlearnConfig
from daemon.engine.evaluate import logits
from daemon.engine.kinds import Kind
from daemon.engine.requests import ForgetRequest

__all__ = ["HeldSet", "balanced_backward", "class_impressions", "held_logit_term", "make_attack"]


def make_attack(model: nn.Module, config: UnlearnConfig) -> TargetedL2PGD:
    return TargetedL2PGD(model, eps=config.pgd_eps, step=config.pgd_step, iterations=config.pgd_iterations,
                         early_exit=config.pgd_early_exit, batch_size=config.attack_batch)


def class_impressions(model: nn.Module, num_classes: int, input_shape: torch.Size, config: UnlearnConfig,
                      generator: torch.Generator, per_class: int = 8) -> torch.Tensor:
    """A data-free, class-balanced sentinel: noise images the model assigns to each class.

    Targeted PGD from uniform noise towards every class (with a wide ball). A healthy model keeps
    them spread over the classes after a round; a collapsed one puts them all into one. Used when
    a method has no adversarial set and the caller gives no probe inputs.
    """
    targets = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.rand((targets.numel(), *input_shape), generator=generator)
    attack = TargetedL2PGD(model, eps=max(config.pgd_eps, 10.0), step=max(config.pgd_step, 0.5),
                           iterations=config.pgd_iterations, rand_init=False, early_exit=True, margin=1.0,
                           batch_size=config.attack_batch)
    return attack(noise, targets, generator).x


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


def _held_targets(work: nn.Module, reference: nn.Module | None, x: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits the held examples keep, and the model's own (the fallback, ``hold_original_share``).

    The held ones are ``reference``'s (the session's original model) wherever the
    model still predicts what the reference predicts, else the model's own; ``labels`` (the label of
    the instance each example was made from) never gets more than the model gives it now.

    Holding at the original outputs repairs the margins earlier rounds eroded around this round's
    instances instead of freezing the erosion in (MNIST 10 × 32; mnist_notes.md, session 7). Where an
    earlier round deliberately changed the decision, the original outputs would ask to undo it, against
    the subspace memory that keeps it; and near an instance an earlier round forgot (a near-duplicate of
    this round's), the original margin of the label is what that round took away, so asking for it back
    would fight this round's own forgetting.
    """
    current = logits(work, x)
    if reference is None:
        return current, current
    original = logits(reference, x)
    col = labels.to(original.device).unsqueeze(1)
    target = original.scatter(1, col, torch.minimum(original.gather(1, col), current.gather(1, col)))
    agree = (original.argmax(1) == current.argmax(1)).unsqueeze(1)
    return torch.where(agree, target, current), current


def balanced_backward(loss_f: torch.Tensor, loss_a: torch.Tensor, params: list[nn.Parameter], floor: float,
                      balance: float, penalty: torch.Tensor | None) -> None:
    """Set ``p.grad`` to g_forget + s * g_held (+ the penalty's), s = max(floor, balance * |g_forget| / |g_held|).

    The forget term's per-instance weights grow without bound while an instance resists; with a
    fixed held weight the forget gradient soon drowns the held one, and (under Adam's per-weight
    normalisation) the steps become plain gradient ascent: test accuracy dips by several points
    while the last instances flip, and the held term only partly repairs it afterwards. Scaling the
    held gradient to keep at least ``balance`` times the forget gradient's norm keeps every step
    regularised (MNIST k = 64, 3 seeds: 1.30 -> 0.70 pp test loss; mnist_notes.md).
    """
    g_f = torch.autograd.grad(loss_f, params, allow_unused=True)
    g_a = torch.autograd.grad(loss_a, params, allow_unused=True)
    norm_f = torch.sqrt(sum((g.pow(2).sum() for g in g_f if g is not None), torch.zeros(())))
    norm_a = torch.sqrt(sum((g.pow(2).sum() for g in g_a if g is not None), torch.zeros(())))
    scale = max(floor, balance * float(norm_f) / max(float(norm_a), 1e-12))
    if penalty is not None:
        penalty.backward()
    for p, gf, ga in zip(params, g_f, g_a):
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        if gf is not None:
            grad = grad + gf
        if ga is not None:
            grad = grad + scale * ga
        p.grad = grad


@dataclass
class HeldSet:
    """The held examples of one round: inputs, the class each stands for, the logits it keeps, the model's own.

    ``x`` is None when there is nothing to hold (a method that holds nothing, a satisfied request, a zero
    budget of every part): such a set adds no term. The adversarial examples come first, ``adversarial`` of them.
    """

    config: UnlearnConfig
    forget_class: int | None = None
    x: torch.Tensor | None = None
    classes: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    own: torch.Tensor | None = None
    adversarial: int = 0
    attack_example_iterations: int = 0
    attack_full_iterations: int = 0
    attack_success: float = float("nan")
    #: the attack was aborted (``should_abort``): the round takes no step
    aborted: bool = False
    #: the step after which the set keeps the model's own logits instead (None: never switched)
    fallback_step: int | None = None
    _soft: torch.Tensor | None = None
    _relax_at: int | None = None
    _pos: int = 0

    @classmethod
    def prepare(cls, work: nn.Module, request: ForgetRequest, kind: Kind, config: UnlearnConfig, *,
                generator: torch.Generator, num_classes: int, reference: nn.Module | None,
                should_abort: Callable[[], bool] | None, satisfied: bool) -> HeldSet:
        """Attack, anchors and impressions, in that order of draws from ``generator``; nothing for a round
        that takes no step (``satisfied``, or the attack aborted)."""
        held = cls(config, request.forget_class)
        device = next(work.parameters()).device
        res = None
        if config.adv_per_instance > 0 and not satisfied:
            targets = other_class_targets(request.labels, num_classes, config.adv_per_instance, generator)
            try:
                res = make_attack(work, config)(request.x.repeat_interleave(config.adv_per_instance, 0), targets,
                                                generator, should_abort)
            except AttackAborted:
                held.aborted = True
        if res is not None:
            keep = torch.ones_like(res.reached)
            if not kind.keeps_unreached_adversarial() and bool(res.reached.any()):
                # Forgetting a class must generalise to all its inputs: an example the attack could not
                # move out of the class would pin the class's own region in place. Keep those that left.
                keep = res.reached
            adv_x = res.x[keep].to(device)
            made_from = request.labels.repeat_interleave(config.adv_per_instance)[keep.cpu()]
            kept, own = (t.to(device) for t in _held_targets(work, reference, adv_x, made_from))
            held._add(adv_x, res.targets[keep].to(device), kept, own)
            held.adversarial = int(adv_x.shape[0])
            held.attack_example_iterations = res.example_iterations
            held.attack_full_iterations = res.x.shape[0] * res.max_iterations
            held.attack_success = res.success_rate
        if satisfied or held.aborted or not kind.instance_scoped:
            # forget_class is left out: copies of a class's examples are the class, and must go with it
            return held.ready()
        if config.anchor_deform:
            anchors = deformations(request.x, config.anchor_deform, generator).to(device)
            kept, own = (t.to(device) for t in _held_targets(
                work, reference, anchors, request.labels.repeat_interleave(config.anchor_deform)))
            held._add(anchors, kept.argmax(1), kept, own)
        if config.held_impressions:
            # held at the model's own logits (not the reference's): off the data, the original outputs are no
            # repair, and pulling the live model back to them there moved it elsewhere (MNIST continual, session 8)
            per_class = -(-config.held_impressions // num_classes)
            impressions = class_impressions(work, num_classes, request.x.shape[1:], config, generator,
                                            per_class=per_class)[:config.held_impressions].to(device)
            own = logits(work, impressions)
            held._add(impressions, own.argmax(1), own, own)
        return held.ready()

    def _add(self, x: torch.Tensor, classes: torch.Tensor, kept: torch.Tensor, own: torch.Tensor) -> None:
        if self.x is None:
            self.x, self.classes, self.kept, self.own = x, classes, kept, own
            return
        self.x, self.classes, self.kept, self.own = (
            torch.cat(pair) for pair in zip((self.x, self.classes, self.kept, self.own), (x, classes, kept, own)))

    def ready(self) -> HeldSet:
        """Fix the soft targets and when the set falls back to the model's own logits.

        Where the reference's outputs are held, the round falls back to the model's own after its share of
        the budget: near an instance an earlier round forgot (a near-duplicate), the original outputs ask
        for the margin that round took away, and the memory keeps that round's instance where it is.
        """
        if self.kept is not None:
            self._soft = F.softmax(self.kept, 1)
            if not torch.equal(self.own, self.kept):
                self._relax_at = max(1, int(self.config.max_steps * self.config.hold_original_share))
        return self

    @property
    def size(self) -> int:
        return 0 if self.x is None else int(self.x.shape[0])

    @property
    def anchors(self) -> int:
        """Held examples that are not adversarial (affine copies, class impressions)."""
        return self.size - self.adversarial

    def sentinel(self) -> torch.Tensor | None:
        """The held inputs as a collapse sentinel (None when there are none)."""
        return None if self.x is None else self.x.cpu()

    def loss(self, work: nn.Module, step: int) -> tuple[torch.Tensor, int] | None:
        """Step ``step``'s held term on the next batch of the set, and the batch's size; None: nothing held."""
        if self.x is None:
            return None
        config = self.config
        if self._relax_at is not None and step > self._relax_at and self.fallback_step is None:
            self.kept, self._soft, self.fallback_step = self.own, F.softmax(self.own, 1), step - 1
        idx = torch.arange(self._pos, self._pos + config.adv_batch, device=self.x.device) % self.x.shape[0]
        self._pos += config.adv_batch
        logits_a = work(self.x[idx])
        if config.adv_loss == "ce":
            return F.cross_entropy(logits_a, self.classes[idx]), idx.shape[0]
        if config.adv_loss == "kl":
            return F.kl_div(F.log_softmax(logits_a, 1), self._soft[idx], reduction="batchmean"), idx.shape[0]
        return held_logit_term(logits_a, self.kept[idx], self.forget_class), idx.shape[0]
