"""One unlearning round: the loop that optimises a method's forget term under one stopping rule, and its health checks.

Pure engine: tensors and modules in, a ``RoundResult`` out. The round never publishes anything;
it trains a *copy* of the model and hands back its weights, so a failed round leaves the caller's
model exactly as it was. What a method holds beside its forget term comes from its plugins: the held
set (``daemon.engine.held``) and the importance penalty (``daemon.engine.importance_plugin``); what the
request asks (goal, stopping rule, scope) comes from its kind (``daemon.engine.kinds``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from daemon.engine.anchors import deformations
from daemon.engine.config import UnlearnConfig
from daemon.engine.evaluate import eval_mode, predict
from daemon.engine.held import HeldSet, balanced_backward, class_impressions
from daemon.engine.importance import ImportanceRegulariser
from daemon.engine.importance_plugin import ImportancePlugin
from daemon.engine.kinds import ForgetInstances, Kind, get_kind
from daemon.engine.methods import Method
from daemon.engine.heads import find_head
from daemon.engine.requests import ForgetRequest
from daemon.engine.protection import protection_report
from daemon.engine.subspace import SubspaceMemory
from daemon.engine.unseen import (HeldOutReference, MembershipEvidence, ModelReference, confidence_score,
                                  toward_reference_loss)

if TYPE_CHECKING:
    from daemon.engine.subspace import _UpdateProjector

__all__ = ["OUTCOMES", "RoundResult", "TrajectoryPoint", "run_round"]

#: Success outcomes name what was achieved; the others mean the round must not be published.
OUTCOMES = ("forgotten", "relabelled", "budget_exhausted", "diverged", "collapsed", "aborted")


@dataclass(frozen=True)
class TrajectoryPoint:
    step: int
    acc_forget: float
    acc_track: float | None = None


@dataclass
class RoundResult:
    """What a round did. ``state`` holds the unlearned weights (CPU tensors) whatever the outcome."""

    outcome: str
    reason: str | None
    method: str
    config: UnlearnConfig
    steps: int
    attack_s: float
    optimise_s: float
    wall_s: float
    acc_forget: float
    predictions_before: torch.Tensor
    predictions_after: torch.Tensor
    state: dict[str, torch.Tensor]
    attack_example_iterations: int = 0
    attack_full_iterations: int = 0
    attack_success: float = float("nan")
    adversarial_examples: int = 0
    anchor_examples: int = 0
    #: seconds spent evaluating ``track`` along the trajectory, left out of ``optimise_s`` and ``wall_s``
    tracking_s: float = 0.0
    #: seconds a session spent extending its subspace memory after the round (included in ``wall_s``)
    memory_s: float = 0.0
    trajectory: list[TrajectoryPoint] = field(default_factory=list)
    #: the request's kind (``forget``, ``relabel``, ``forget_class``)
    kind: str = ForgetInstances.name
    #: the step after which the held examples kept the model's own outputs instead of the reference's
    #: (``config.hold_original_share``); None when they never switched
    held_fallback_step: int | None = None
    #: layers the subspace memory kept fixed for the whole round (``config.memory_min_free``)
    frozen_layers: tuple[str, ...] = ()
    #: the importance penalty weights the round used (methods with importance), what a commit consolidates
    importance: dict[str, torch.Tensor] | None = None
    #: the instances' membership against the held-out reference after the round (``forget`` rounds given one)
    membership: MembershipEvidence | None = None
    #: seconds the membership check took (scoring the reference and the instances; included in ``wall_s``)
    check_s: float = 0.0
    #: what ended a successful round: "goal" (the kind's rule), "unseen" (the membership check) or
    #: "already_unseen" (the instances looked held-out before any step: the model is unchanged)
    stopped_by: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.outcome == get_kind(self.kind).success


def _accuracy_of(pred: torch.Tensor, request: ForgetRequest, kind: Kind) -> float:
    """Accuracy the stopping rule reads: on the labels (forget kinds) or on the targets (relabel)."""
    return float((pred == kind.wanted(request).cpu()).float().mean())


def _forget_accuracy(model: nn.Module, request: ForgetRequest, kind: Kind) -> tuple[float, torch.Tensor]:
    pred = predict(model, request.x)
    return _accuracy_of(pred, request, kind), pred


def _top_share(model: nn.Module, sentinel: torch.Tensor | None) -> float:
    """The share of ``sentinel`` predicted as its most frequent class (0 for fewer than two inputs)."""
    if sentinel is None or sentinel.shape[0] < 2:
        return 0.0
    pred = predict(model, sentinel)
    return float(torch.bincount(pred).max()) / pred.numel()


def _collapsed(model: nn.Module, sentinel: torch.Tensor | None, share: float, share_before: float) -> bool:
    return share_before < share <= _top_share(model, sentinel)


def _forget_set_collapsed(model: nn.Module, request: ForgetRequest, share: float, min_size: int = 8) -> bool:
    """The signature of gradient-ascent collapse (method.md §9): instances of many classes all end up
    in one class. Noise-based class impressions can stay spread while real digits do not, so the
    forget set is checked too (for a mixed-label ``forget`` request of at least ``min_size``)."""
    if not get_kind(request.kind).checks_forget_set_collapse or len(request) < min_size:
        return False
    labels = request.labels.cpu()
    if float(torch.bincount(labels).max()) / labels.numel() >= share:
        return False   # the labels themselves are (nearly) one class: nothing to conclude
    pred = predict(model, request.x)
    return float(torch.bincount(pred).max()) / pred.numel() >= share


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _trainable(work: nn.Module, request: ForgetRequest, config: UnlearnConfig, num_classes: int,
               head_name: str | None = None) -> list[nn.Parameter]:
    """The weights a round may move. A class round scoped to ``head_row`` moves only that class's row
    of the output layer (``daemon.engine.heads``: declared by ``head_name`` or found; a conv head's
    output channel): lowering one logit cannot make any other class's example look like the class,
    and leaves every other class's logit exactly as it was."""
    if not get_kind(request.kind).class_row_only(config):
        return [p for p in work.parameters() if p.requires_grad]
    head = find_head(work, num_classes, head=head_name, x=request.x).module
    row = torch.zeros(num_classes, *([1] * (head.weight.dim() - 1)), device=head.weight.device,
                      dtype=head.weight.dtype)
    row[request.forget_class] = 1.0
    head.weight.register_hook(lambda g: g * row)
    params = [head.weight]
    if head.bias is not None:
        head.bias.register_hook(lambda g: g * row.flatten())
        params.append(head.bias)
    return params


@dataclass
class _Prepared:
    """What a round works on: the instances (with a class round's copies), where they go, and the plugins."""

    x: torch.Tensor
    labels: torch.Tensor
    towards: torch.Tensor | None
    held: HeldSet
    regulariser: ImportanceRegulariser | None
    sentinel: torch.Tensor
    attack_s: float


def _prepare(work: nn.Module, request: ForgetRequest, kind: Kind, method: Method, config: UnlearnConfig, *,
             generator: torch.Generator, num_classes: int, importance: dict[str, torch.Tensor] | None,
             reference: nn.Module | None, sentinel: torch.Tensor | None, satisfied: bool,
             should_abort: Callable[[], bool] | None) -> _Prepared:
    """Targets, the held set, a class round's copies, the importance anchor and the sentinel.

    They draw from ``generator`` in this order, which a bit-identical round keeps: the method's targets, the
    attack's targets, the attack, the anchors, the impressions, the class copies, a noise sentinel (and,
    after the round, the session's memory copies). A request the model already satisfies (every instance misclassified, or on
    its target) takes no step: nothing that only the steps use is made for it (attack, copies, impressions,
    a noise sentinel)."""
    device = next(work.parameters()).device
    x, labels = request.x.to(device), request.labels.to(device)
    towards = None if satisfied else method.towards(work, request, config, generator)
    towards_d = towards.to(device) if towards is not None else None
    t_attack = time.perf_counter()
    held = (HeldSet.prepare(work, request, kind, config, generator=generator, num_classes=num_classes,
                            reference=reference, should_abort=should_abort, satisfied=satisfied)
            if method.uses_adversarial else HeldSet(config))
    no_steps = held.aborted or satisfied     # the loop stops at once: nothing more to prepare for it
    copies = kind.copies(config)
    if copies > 0 and not no_steps:
        # forgetting a class must generalise to the class: its examples' copies are forgotten with them
        x = torch.cat([x, deformations(request.x, copies, generator).to(device)])
        labels = torch.cat([labels, labels.repeat_interleave(copies)])
        if towards_d is not None:   # the relabelling baselines: each copy goes where its example goes
            towards_d = torch.cat([towards_d, towards_d.repeat_interleave(copies)])
    attack_s = time.perf_counter() - t_attack
    regulariser = None if importance is None else ImportancePlugin.regulariser(importance, work, config.lam)
    if sentinel is None and no_steps:
        sentinel = request.x          # never used: the loop stops at once
    if sentinel is None:   # callers with real inputs (the daemon's probe set, a test split) pass them
        sentinel = held.sentinel()
        if sentinel is None:
            sentinel = class_impressions(work, num_classes, request.x.shape[1:], config, generator)
    return _Prepared(x, labels, towards_d, held, regulariser, sentinel, attack_s)


def _optimiser(work: nn.Module, request: ForgetRequest, kind: Kind, config: UnlearnConfig, x: torch.Tensor,
               memory: SubspaceMemory | None, num_classes: int, head: str | None = None
               ) -> tuple[_UpdateProjector | None, list[nn.Parameter], torch.optim.Optimizer | None]:
    """The memory's projector (instance rounds), the weights that move, and their optimiser (None: none move)."""
    projector = None
    if memory is not None and kind.instance_scoped:
        projector = memory.projector(work, x, config.memory_min_free)
    params = _trainable(work, request, config, num_classes, head)
    fixed: dict[int, nn.Parameter] = {}
    if projector is not None and projector.frozen:
        # A layer the memory keeps fixed for the round leaves the optimiser and the backward pass: its
        # gradient would be thrown away after every step, yet it would count in the held/forget balance
        # (and in a continual round the convolutions are the frozen ones: the backward stops above them).
        fixed = {id(p): p for p in projector.frozen_parameters()}
    if projector is not None and config.freeze_unprotected:
        # Once the memory holds earlier rounds, what it cannot hold (normalisation scale and shift, tokens)
        # would carry the relapse it stops elsewhere: a shifted BatchNorm changes what every later layer sees
        # of an earlier instance (benchmarks/results/byo_notes.md).
        left_out = set(protection_report(work).left_out)
        fixed |= {id(p): p for n, p in work.named_parameters() if n in left_out}
    if fixed:
        for p in fixed.values():
            p.requires_grad_(False)
        params = [p for p in params if id(p) not in fixed]
    if not params:
        return projector, params, None
    if config.optimizer == "sgd":
        return projector, params, torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                                  weight_decay=config.weight_decay)
    return projector, params, torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


class _Membership:
    """The ``unseen`` goal's check (``daemon.engine.unseen``) over one round, and the evidence it leaves.

    The instances' scores come from the logits the loop computes anyway; the probe set is re-scored every
    ``config.unseen_refresh`` steps, before any stop it would allow, and once more at the end for the receipt.
    With reference models' scores (``per_example``) the check replaces the zero rule: the round pushes each
    instance to its own target (:func:`toward_reference_loss`) and stops on the check alone."""

    def __init__(self, work: nn.Module, request: ForgetRequest, config: UnlearnConfig,
                 heldout: tuple[torch.Tensor, torch.Tensor] | None, num_classes: int,
                 out_scores: torch.Tensor | None = None) -> None:
        t0 = time.perf_counter()
        self.labels = request.labels.cpu()
        self.margin, self.refresh_every = config.unseen_margin, config.unseen_refresh
        self.stops = config.stop == "unseen"
        self.per_example = out_scores is not None
        if out_scores is not None:
            if out_scores.shape[0] != request.x.shape[0]:
                raise ValueError(f"reference scores for {out_scores.shape[0]} instances, the request has "
                                 f"{request.x.shape[0]}")
            self.ref: HeldOutReference | ModelReference = ModelReference(out_scores)
        else:
            assert heldout is not None
            n = config.unseen_reference
            self.ref = HeldOutReference(heldout[0][:n], heldout[1][:n], num_classes).refresh(work)
        self.fresh_at: int | None = 0          # the step whose weights the reference was last scored under
        with eval_mode(work):
            scores = confidence_score(work(request.x.to(next(work.parameters()).device)), self.labels)
        self.scores_before = scores
        self.auc_before = self.ref.auc(scores, self.labels)
        self.auc = self.auc_before
        self.seconds = time.perf_counter() - t0

    def reached(self, scores: torch.Tensor) -> bool:
        """The mean statistic within the margin and, with reference models, no instance (``scores``) far above its
        target."""
        if self.auc > 0.5 + self.margin:
            return False
        return not self.per_example or self.ref.none_far_above(scores)

    def check(self, work: nn.Module, logits_req: torch.Tensor, step: int) -> bool:
        """Whether the instances (their logits under the weights ``step`` left) now look held-out."""
        t0 = time.perf_counter()
        scores = confidence_score(logits_req, self.labels)
        fresh = self.per_example or step % self.refresh_every == 0
        if fresh:
            self.ref.refresh(work)
            self.fresh_at = step
        self.auc = self.ref.auc(scores, self.labels)
        if self.reached(scores) and not fresh:      # a round moves the held-out scores too: stop only on fresh ones
            self.auc = self.ref.refresh(work).auc(scores, self.labels)
            self.fresh_at = step
        self.last_scores = scores
        self.seconds += time.perf_counter() - t0
        return self.reached(scores)

    def evidence(self, work: nn.Module, x: torch.Tensor, steps: int) -> MembershipEvidence:
        """The evidence on the weights the round left (a round that took no step left them as they were: the
        scores before it stand)."""
        t0 = time.perf_counter()
        if steps == 0:
            scores = self.scores_before
        elif self.fresh_at == steps:           # the check that stopped the round scored these very weights
            scores = self.last_scores
        else:
            self.ref.refresh(work)
            with eval_mode(work):
                scores = confidence_score(work(x.to(next(work.parameters()).device)), self.labels)
        out = self.ref.evidence(scores, self.labels, self.margin, self.auc_before)
        self.seconds += time.perf_counter() - t0
        return out


class _Loop:
    """The optimisation loop of one round and its per-step checks (stopping rule, push growth, health)."""

    def __init__(self, work: nn.Module, request: ForgetRequest, kind: Kind, method: Method, config: UnlearnConfig,
                 prep: _Prepared, params: list[nn.Parameter], opt: torch.optim.Optimizer | None,
                 projector: _UpdateProjector | None,
                 acc0: float, track: tuple[torch.Tensor, torch.Tensor] | None, track_every: int,
                 progress: Callable[[int, int, float], None] | None, membership: _Membership | None = None
                 ) -> None:
        self.work, self.request, self.kind, self.method, self.config = work, request, kind, method, config
        self.prep, self.params, self.opt, self.projector = prep, params, opt, projector
        self.track, self.track_every, self.progress = track, track_every, progress
        self.membership = membership if membership is not None and membership.stops else None
        # with reference models the goal is each instance's own score, not the zero rule (the membership check stops)
        self.zero_rule = self.membership is None or not self.membership.per_example
        self.stopped_by: str | None = None
        self.n_req = request.x.shape[0]
        self.acc = acc0
        self.steps = 0
        self.trajectory: list[TrajectoryPoint] = []
        self.tracking_s = 0.0   # the benchmark's trajectory evaluations: instrumentation, not the round's work
        # Per-instance dual variables: an instance that resists gets a growing share of the push, so
        # easy instances flip with a gentle step and only the hard ones pay for more (forget_boost = 1:
        # a plain sum, as in L2UL).
        self.inst_w = torch.ones(prep.x.shape[0], device=prep.x.device)
        self.tracking = track is not None and track_every > 0

    def record(self, step: int, acc: float) -> None:
        t = time.perf_counter()
        tracked = None
        if self.track is not None:
            tracked = float((predict(self.work, self.track[0]) == self.track[1]).float().mean())
        self.trajectory.append(TrajectoryPoint(step, acc, tracked))
        self.tracking_s += time.perf_counter() - t

    def after_update(self, logits_eval: torch.Tensor) -> tuple[str, str | None] | None:
        """The per-step checks on the weights an update left: stopping rule, push growth, health."""
        config, kind = self.config, self.kind
        self.acc = _accuracy_of(logits_eval[:self.n_req].argmax(1).cpu(), self.request, kind)
        still = kind.still_active(logits_eval, self.prep.labels, self.prep.towards, config)
        if not self.zero_rule:      # still above its own target: the instances the push has not brought down yet
            assert self.membership is not None and isinstance(self.membership.ref, ModelReference)
            still = torch.zeros_like(still)
            still[:self.n_req] = (confidence_score(logits_eval[:self.n_req], self.prep.labels[:self.n_req])
                                  > self.membership.ref.targets()).to(still.device)
        if config.forget_boost > 1.0:
            self.inst_w = torch.where(still, self.inst_w * config.forget_boost, self.inst_w)
        if self.tracking and self.steps % self.track_every == 0:
            self.record(self.steps, self.acc)
        if self.progress is not None:
            self.progress(self.steps, config.max_steps, self.acc)
        if self.steps % config.check_every == 0 and not _finite(self.work):
            return "diverged", f"non-finite weights at step {self.steps}"
        if self.zero_rule and kind.stop_reached(self.acc, config) and not (kind.stops_on_margin(config)
                                                                           and bool(still[:self.n_req].any())):
            self.stopped_by = "goal"
            return kind.success, None
        # unseen: the instances look held-out; checked every step, so the round never pushes past it
        if self.membership is not None and self.membership.check(self.work, logits_eval[:self.n_req], self.steps):
            self.stopped_by = "unseen"
            return kind.success, None
        return None

    def update(self, logits_f: torch.Tensor) -> tuple[str, str | None] | None:
        """One step on the forget term, the held term and the penalty; a verdict if the loss is not finite."""
        config, prep, work = self.config, self.prep, self.work
        if config.mask_forgotten:
            with torch.no_grad():
                active = self.kind.still_active(logits_f, prep.labels, prep.towards, config)
        else:
            active = torch.ones_like(prep.labels, dtype=torch.bool)
        if self.zero_rule:
            loss_f = self.method.forget_loss(logits_f, prep.labels, prep.towards, active, config,
                                             self.inst_w if config.forget_boost > 1.0 else None,
                                             margin=self.kind.forget_margin(config))
        else:
            assert self.membership is not None and isinstance(self.membership.ref, ModelReference)
            loss_f = toward_reference_loss(logits_f[:self.n_req], prep.labels[:self.n_req],
                                           self.membership.ref.targets(),
                                           self.inst_w[:self.n_req] if config.forget_boost > 1.0 else None)
        loss = loss_f
        held = prep.held.loss(work, self.steps)
        if held is not None:
            loss_a, b_a = held
            if config.adv_weight is None:   # L2UL: per-sample mean over the union batch
                b_f = prep.x.shape[0]
                loss = (b_f * loss_f + b_a * loss_a) / (b_f + b_a)
            else:
                loss = loss_f + config.adv_weight * loss_a
        penalty = None if prep.regulariser is None else prep.regulariser.penalty(work)
        if penalty is not None:
            loss = loss + penalty
        if not math.isfinite(float(loss.detach())):
            return "diverged", f"non-finite loss at step {self.steps}"
        self.opt.zero_grad(set_to_none=True)
        if config.held_balance > 0 and held is not None and config.adv_weight is not None:
            balanced_backward(loss_f, loss_a, self.params, config.adv_weight, config.held_balance, penalty)
        else:
            loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip)
        if self.projector is not None:
            self.projector.before()
        self.opt.step()
        if self.projector is not None:
            self.projector.after()
        return None

    def run(self, should_abort: Callable[[], bool] | None) -> tuple[str | None, str | None]:
        """Step until the stopping rule, a fault or the budget; the outcome (None: budget ran out) and why."""
        config, work, x = self.config, self.work, self.prep.x
        # Unless BatchNorm trains (bn_train), the training forward runs in eval mode: a step's forward
        # on the instances is the eval forward of the weights the previous step left, so it serves that
        # step's stopping check and saves a forward per step (bit-identical to a separate eval pass).
        reuse = not config.bn_train
        pending = False     # an update whose stopping check has not run yet
        verdict = None
        while self.steps < config.max_steps:
            work.train(config.bn_train)
            logits_f = work(x)
            if pending:
                pending = False
                verdict = self.after_update(logits_f.detach())
                if verdict is not None:
                    return verdict
            if should_abort is not None and should_abort():
                return "aborted", "the round was aborted"
            self.steps += 1
            verdict = self.update(logits_f)
            if verdict is not None:
                return verdict
            if reuse:
                pending = True
                continue
            with eval_mode(work):
                verdict = self.after_update(work(x))
            if verdict is not None:
                return verdict
        if pending:   # the budget ran out: check the last update's weights
            with eval_mode(work):
                verdict = self.after_update(work(x))
            if verdict is not None:
                return verdict
        return None, None


def _health(work: nn.Module, request: ForgetRequest, kind: Kind, config: UnlearnConfig, outcome: str,
            reason: str | None, steps: int, sentinel: torch.Tensor, share_before: float) -> tuple[str, str | None]:
    """The checks on the weights a successful round left: finite, no collapse of the sentinel or the forget set."""
    if outcome == kind.success and not _finite(work):
        return "diverged", "non-finite weights"
    if outcome == kind.success and _collapsed(work, sentinel, config.collapse_share, share_before):
        return "collapsed", f"one class takes >= {config.collapse_share:.0%} of the sentinel predictions"
    # A round that took no step left the model as it found it: whatever that model predicts, the round did not do it.
    if outcome == kind.success and steps > 0 and _forget_set_collapsed(work, request, config.collapse_share):
        return "collapsed", (f"one class takes >= {config.collapse_share:.0%} of the forget-set "
                             "predictions though their labels are mixed")
    return outcome, reason


def run_round(
    model: nn.Module,
    request: ForgetRequest,
    method: Method,
    config: UnlearnConfig,
    *,
    generator: torch.Generator,
    num_classes: int,
    importance: ImportancePlugin | None = None,
    memory: SubspaceMemory | None = None,
    reference: nn.Module | None = None,
    sentinel: torch.Tensor | None = None,
    track: tuple[torch.Tensor, torch.Tensor] | None = None,
    track_every: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    should_abort: Callable[[], bool] | None = None,
    head: str | None = None,
    heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
    reference_scores: torch.Tensor | None = None,
) -> RoundResult:
    """Unlearn ``request`` from a copy of ``model`` with ``method``; never touches ``model`` itself.

    ``importance``: the (accumulated) importance of earlier rounds for ``adv_imp``, whose weights for this
    round (``RoundResult.importance``) anchor the model as it is now; the plugin itself is left as it was.
    ``memory``: earlier rounds' protected subspaces; every update of an instance round is projected off
    them (class rounds are global by design and are not). ``reference``: the model whose logits the held
    examples keep (``config.hold_at``; None: the model as it is now). ``sentinel``: inputs whose
    predictions must not all fall into one class (defaults to the held set). ``track``: an (x, y) set
    whose accuracy is recorded along the trajectory every ``track_every`` steps (benchmark plots).
    ``should_abort`` is polled every step. ``head``: the classifier head's module name for class rounds
    scoped to its row (None: found by output width, ``daemon.engine.heads``). ``heldout``: labelled examples
    the model never trained on (the daemon's probe set): a ``forget`` round then reports its instances'
    membership against them (``RoundResult.membership``), and ``config.stop`` "unseen" stops on it.
    ``reference_scores``: the instances' scores under reference models that never trained on them
    ([instances, models], NaN where one did; ``daemon.engine.unseen.ModelReference``): the per-example check,
    used instead of ``heldout``'s; with ``stop`` "unseen" the round then goes past the zero rule when they say so.

    BatchNorm: every forward of the round runs on the copy, in eval mode unless ``config.bn_train`` (the
    ``paper`` preset, as L2UL's code: its training forwards then update the copy's running statistics,
    which the round's state carries). With the default (``bn_train`` False) no forward of a round runs a
    normalisation layer in train mode (attack, anchors, impressions, MAS, loop, checks), so the running
    statistics and ``num_batches_tracked`` leave the round bit-unchanged.
    """
    if method.oracle:
        raise ValueError(f"{method.name} is a benchmark oracle and needs the training data; it cannot run a round")
    if method.uses_importance and importance is None:
        raise ValueError(f"{method.name} needs importance weights")
    request.validate(num_classes=num_classes, input_shape=tuple(request.x.shape[1:]))
    kind = get_kind(request.kind)
    measured = kind.chooses_goal and (heldout is not None or reference_scores is not None)
    if config.stop == "unseen" and not measured:
        raise ValueError("stop 'unseen' is for forget rounds given a held-out reference (the probe set or "
                         "reference models' scores)")
    weights = importance.round_weights(model, request.x, train=config.bn_train) if method.uses_importance else None
    wall0 = time.perf_counter()
    work = copy.deepcopy(model)
    acc0, pred_before = _forget_accuracy(work, request, kind)
    membership = _Membership(work, request, config, heldout, num_classes, reference_scores) if measured else None
    per_example_goal = membership is not None and membership.stops and membership.per_example
    satisfied = kind.stop_reached(acc0, config) and not per_example_goal
    stopped_by = "goal" if satisfied else None
    if not satisfied and membership is not None and membership.stops and membership.reached(membership.scores_before):
        satisfied, stopped_by = True, "already_unseen"   # nothing to forget: the round takes no step
    prep = _prepare(work, request, kind, method, config, generator=generator, num_classes=num_classes,
                    importance=weights, reference=reference, sentinel=sentinel, satisfied=satisfied,
                    should_abort=should_abort)
    # A set whose predictions already sit in one class (a single instance's held examples mostly keep
    # its class) says nothing about collapse: only a round that *puts* them there has collapsed.
    share_before = _top_share(work, prep.sentinel)
    projector, params, opt = _optimiser(work, request, kind, config, prep.x, memory, num_classes, head)
    loop = _Loop(work, request, kind, method, config, prep, params, opt, projector, acc0, track, track_every, progress,
                 membership)
    if loop.tracking:
        loop.record(0, acc0)
    t_opt, tracked_before_opt = time.perf_counter(), loop.tracking_s
    if satisfied:
        outcome, reason = kind.success, None
    elif opt is None:
        outcome = "budget_exhausted"
        reason = "the subspace memory leaves no layer free to move: the memory is full for these instances"
    else:
        outcome, reason = loop.run(should_abort)
        stopped_by = loop.stopped_by
    optimise_s = time.perf_counter() - t_opt - (loop.tracking_s - tracked_before_opt)
    if outcome is None:
        outcome = "budget_exhausted"
        reason = f"forget accuracy {loop.acc:.3f} after the step budget of {config.max_steps}"
        if per_example_goal:
            assert membership is not None
            reason = (f"membership {membership.auc:.3f} above {0.5 + membership.margin:.3f} after the step budget "
                      f"of {config.max_steps}")
    outcome, reason = _health(work, request, kind, config, outcome, reason, loop.steps, prep.sentinel, share_before)
    if loop.tracking and (not loop.trajectory or loop.trajectory[-1].step != loop.steps):
        loop.record(loop.steps, loop.acc)
    acc_final, pred_after = _forget_accuracy(work, request, kind)
    evidence = membership.evidence(work, request.x, loop.steps) if membership is not None else None
    work.eval()
    held = prep.held
    return RoundResult(
        outcome=outcome, reason=reason, method=method.name, config=config, steps=loop.steps, kind=request.kind,
        held_fallback_step=held.fallback_step,
        frozen_layers=tuple(sorted(projector.frozen)) if projector is not None else (),
        attack_s=prep.attack_s, optimise_s=optimise_s, wall_s=time.perf_counter() - wall0 - loop.tracking_s,
        tracking_s=loop.tracking_s,
        acc_forget=acc_final, predictions_before=pred_before, predictions_after=pred_after,
        state={k: v.detach().cpu().clone() for k, v in work.state_dict().items()},
        attack_example_iterations=held.attack_example_iterations, attack_full_iterations=held.attack_full_iterations,
        attack_success=held.attack_success, adversarial_examples=held.adversarial, anchor_examples=held.anchors,
        trajectory=loop.trajectory, importance=weights, membership=evidence,
        check_s=membership.seconds if membership is not None else 0.0,
        stopped_by=stopped_by if outcome == kind.success else None,
    )
