"""One unlearning round: prepare (attack, importance), optimise under one stopping rule, check health.

Pure engine: tensors and modules in, a ``RoundResult`` out. The round never publishes anything;
it trains a *copy* of the model and hands back its weights, so a failed round leaves the caller's
model exactly as it was.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from daemon.engine.config import UnlearnConfig
from daemon.engine.evaluate import eval_mode, logits, predict
from daemon.engine.importance import ImportanceRegulariser
from daemon.engine.methods import Method, forget_term, held_logit_term, label_margin, make_attack
from daemon.engine.models import output_layer
from daemon.engine.anchors import deformations
from daemon.engine.attacks import AttackAborted, TargetedL2PGD, other_class_targets
from daemon.engine.requests import ForgetRequest
from daemon.engine.subspace import SubspaceMemory

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
    kind: str = "forget"
    #: the step after which the held examples kept the model's own outputs instead of the reference's
    #: (``config.hold_original_share``); None when they never switched
    held_fallback_step: int | None = None
    #: layers the subspace memory kept fixed for the whole round (``config.memory_min_free``)
    frozen_layers: tuple[str, ...] = ()

    @property
    def succeeded(self) -> bool:
        return self.outcome in ("forgotten", "relabelled")


def _success_outcome(kind: str) -> str:
    return "relabelled" if kind == "relabel" else "forgotten"


def _accuracy_of(pred: torch.Tensor, request: ForgetRequest) -> float:
    """Accuracy the stopping rule reads: on the labels (forget kinds) or on the targets (relabel)."""
    wanted = request.targets if request.kind == "relabel" else request.labels
    return float((pred == wanted.cpu()).float().mean())


def _forget_accuracy(model: nn.Module, request: ForgetRequest) -> tuple[float, torch.Tensor]:
    pred = predict(model, request.x)
    return _accuracy_of(pred, request), pred


def _stop_reached(acc: float, request: ForgetRequest, config: UnlearnConfig) -> bool:
    if request.kind == "relabel":
        return acc >= 1.0
    level = config.stop_level if config.stop == "calibrated" else 0.0
    return acc <= level + 1e-12


def _still_active(logits: torch.Tensor, labels: torch.Tensor, towards: torch.Tensor | None, kind: str,
                  config: UnlearnConfig) -> torch.Tensor:
    """Instances the forget term still works on: not yet unlearned (forget_class, and forget with a
    ``forget_margin``: not yet past the margin).

    A class round's goal is leaving the class, whichever way a method pushes (``towards``: the
    relabelling baselines), so every method stops on the same rule there."""
    if kind == "forget_class" or (towards is None and config.forget_margin > 0):
        margin = config.class_margin if kind == "forget_class" else config.forget_margin
        return label_margin(logits, labels) > -margin
    if towards is not None:
        return logits.argmax(1) != towards
    return logits.argmax(1) == labels


def _margin_stop(request: ForgetRequest, config: UnlearnConfig) -> bool:
    """Rounds that end only once every instance is past its margin, not merely misclassified."""
    return request.kind == "forget_class" or (request.kind == "forget" and config.forget_margin > 0)


def _top_share(model: nn.Module, sentinel: torch.Tensor | None) -> float:
    """The share of ``sentinel`` predicted as its most frequent class (0 for fewer than two inputs)."""
    if sentinel is None or sentinel.shape[0] < 2:
        return 0.0
    pred = predict(model, sentinel)
    return float(torch.bincount(pred).max()) / pred.numel()


def _collapsed(model: nn.Module, sentinel: torch.Tensor | None, share: float, share_before: float) -> bool:
    return share_before < share <= _top_share(model, sentinel)


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


def _forget_set_collapsed(model: nn.Module, request: ForgetRequest, share: float, min_size: int = 8) -> bool:
    """The signature of gradient-ascent collapse (method.md §9): instances of many classes all end up
    in one class. Noise-based class impressions can stay spread while real digits do not, so the
    forget set is checked too (for a mixed-label ``forget`` request of at least ``min_size``)."""
    if request.kind != "forget" or len(request) < min_size:
        return False
    labels = request.labels.cpu()
    if float(torch.bincount(labels).max()) / labels.numel() >= share:
        return False   # the labels themselves are (nearly) one class: nothing to conclude
    pred = predict(model, request.x)
    return float(torch.bincount(pred).max()) / pred.numel() >= share


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


def _with_held(held: tuple[torch.Tensor, ...] | None, x: torch.Tensor, targets: torch.Tensor, own: torch.Tensor
               ) -> tuple[torch.Tensor, ...]:
    """The held set (inputs, their predicted classes, the logits they keep, the model's own) with ``x`` added."""
    part = (x, targets.argmax(1), targets, own)
    return part if held is None else tuple(torch.cat(pair) for pair in zip(held, part))


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _balanced_backward(loss_f: torch.Tensor, loss_a: torch.Tensor, params: list[nn.Parameter], floor: float,
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


def _trainable(work: nn.Module, request: ForgetRequest, config: UnlearnConfig, num_classes: int) -> list[nn.Parameter]:
    """The weights a round may move. A class round scoped to ``head_row`` moves only that class's row
    of the output layer: lowering one logit cannot make any other class's example look like the class,
    and leaves every other class's logit exactly as it was."""
    if request.kind != "forget_class" or config.class_scope == "all":
        return [p for p in work.parameters() if p.requires_grad]
    head = output_layer(work, num_classes)
    row = torch.zeros(num_classes, 1, device=head.weight.device, dtype=head.weight.dtype)
    row[request.forget_class] = 1.0
    head.weight.register_hook(lambda g: g * row)
    params = [head.weight]
    if head.bias is not None:
        head.bias.register_hook(lambda g: g * row[:, 0])
        params.append(head.bias)
    return params


def run_round(
    model: nn.Module,
    request: ForgetRequest,
    method: Method,
    config: UnlearnConfig,
    *,
    generator: torch.Generator,
    num_classes: int,
    importance_weights: Mapping[str, torch.Tensor] | None = None,
    memory: SubspaceMemory | None = None,
    reference: nn.Module | None = None,
    sentinel: torch.Tensor | None = None,
    track: tuple[torch.Tensor, torch.Tensor] | None = None,
    track_every: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    should_abort: Callable[[], bool] | None = None,
) -> RoundResult:
    """Unlearn ``request`` from a copy of ``model`` with ``method``; never touches ``model`` itself.

    ``importance_weights``: the (accumulated) penalty weights for ``adv_imp``; the anchor is the
    model as it is now. ``memory``: earlier rounds' protected subspaces; every update of an instance
    round is projected off them (class rounds are global by design and are not). ``reference``: the
    model whose logits the held examples keep (``config.hold_at``; None: the model as it is now). ``sentinel``: inputs whose predictions must not all fall into one class
    (defaults to the adversarial set). ``track``: an (x, y) set whose accuracy is recorded along the
    trajectory every ``track_every`` steps (benchmark plots). ``should_abort`` is polled every step.
    """
    if method.oracle:
        raise ValueError(f"{method.name} is a benchmark oracle and needs the training data; it cannot run a round")
    if method.uses_importance and importance_weights is None:
        raise ValueError(f"{method.name} needs importance weights")
    request.validate(num_classes=num_classes, input_shape=tuple(request.x.shape[1:]))
    wall0 = time.perf_counter()
    work = copy.deepcopy(model)
    device = next(work.parameters()).device
    x = request.x.to(device)
    labels = request.labels.to(device)
    acc0, pred_before = _forget_accuracy(work, request)
    # A request the model already satisfies (every instance misclassified, or on its target) takes no step:
    # nothing below that only the steps use is made for it (attack, copies, impressions, a noise sentinel).
    satisfied = _stop_reached(acc0, request, config)

    # --- prepare: targets, adversarial set, importance anchor --------------------------------------
    towards = None if satisfied else method.towards(work, request, config, generator)
    towards_d = towards.to(device) if towards is not None else None
    adv_x = adv_y = adv_soft = adv_logits = own_logits = None
    attack_stats = (0, 0, float("nan"))
    t_attack = time.perf_counter()
    res, attack_aborted = None, False
    if method.uses_adversarial and config.adv_per_instance > 0 and not satisfied:
        attack = make_attack(work, config)
        targets = other_class_targets(request.labels, num_classes, config.adv_per_instance, generator)
        try:
            res = attack(request.x.repeat_interleave(config.adv_per_instance, 0), targets, generator, should_abort)
        except AttackAborted:
            res, attack_aborted = None, True
    if res is not None:
        keep = torch.ones_like(res.reached)
        if request.kind == "forget_class" and bool(res.reached.any()):
            # Forgetting a class must generalise to all its inputs: an example the attack could not
            # move out of the class would pin the class's own region in place. Keep those that left.
            keep = res.reached
        adv_x, adv_y = res.x[keep].to(device), res.targets[keep].to(device)
        made_from = request.labels.repeat_interleave(config.adv_per_instance)[keep.cpu()]
        adv_logits, own_logits = (t.to(device) for t in _held_targets(work, reference, adv_x, made_from))
        adv_soft = F.softmax(adv_logits, 1)
        attack_stats = (res.example_iterations, res.x.shape[0] * res.max_iterations, res.success_rate)
    n_adv = 0 if adv_x is None else int(adv_x.shape[0])
    no_steps = attack_aborted or satisfied     # the loop below stops at once: nothing more to prepare for it
    if method.uses_adversarial and not no_steps and config.anchor_deform and request.kind != "forget_class":
        # forget_class is left out: copies of a class's examples are the class, and must go with it
        anchors = deformations(request.x, config.anchor_deform, generator).to(device)
        anchor_logits, anchor_own = (t.to(device) for t in _held_targets(
            work, reference, anchors, request.labels.repeat_interleave(config.anchor_deform)))
        adv_x, adv_y, adv_logits, own_logits = _with_held(
            None if adv_x is None else (adv_x, adv_y, adv_logits, own_logits), anchors, anchor_logits, anchor_own)
        adv_soft = F.softmax(adv_logits, 1)
    if method.uses_adversarial and not no_steps and config.held_impressions and request.kind != "forget_class":
        # held at the model's own logits (not the reference's): off the data, the original outputs are no
        # repair, and pulling the live model back to them there moved it elsewhere (MNIST continual, session 8)
        per_class = -(-config.held_impressions // num_classes)
        impressions = class_impressions(work, num_classes, request.x.shape[1:], config, generator,
                                        per_class=per_class)[:config.held_impressions].to(device)
        imp_logits = logits(work, impressions)
        adv_x, adv_y, adv_logits, own_logits = _with_held(
            None if adv_x is None else (adv_x, adv_y, adv_logits, own_logits), impressions, imp_logits, imp_logits)
        adv_soft = F.softmax(adv_logits, 1)
    # Where the reference's outputs are held, the round falls back to the model's own after its share of
    # the budget: near an instance an earlier round forgot (a near-duplicate), the original outputs ask
    # for the margin that round took away, and the memory keeps that round's instance where it is.
    relax_at = None
    if own_logits is not None and not torch.equal(own_logits, adv_logits):
        relax_at = max(1, int(config.max_steps * config.hold_original_share))
    relaxed_at = None
    n_req = x.shape[0]
    if request.kind == "forget_class" and config.class_copies > 0 and not no_steps:
        # forgetting a class must generalise to the class: its examples' copies are forgotten with them
        x = torch.cat([x, deformations(request.x, config.class_copies, generator).to(device)])
        labels = torch.cat([labels, labels.repeat_interleave(config.class_copies)])
        if towards_d is not None:   # the relabelling baselines: each copy goes where its example goes
            towards_d = torch.cat([towards_d, towards_d.repeat_interleave(config.class_copies)])
    attack_s = time.perf_counter() - t_attack
    regulariser = None
    if method.uses_importance:
        anchor = {n: p.detach().clone() for n, p in work.named_parameters()}
        regulariser = ImportanceRegulariser(importance_weights, anchor, config.lam)
    if sentinel is None and no_steps:
        sentinel = request.x          # never used: the loop below stops at once
    if sentinel is None:   # callers with real inputs (the daemon's probe set, a test split) pass them
        sentinel = adv_x.cpu() if adv_x is not None else class_impressions(work, num_classes, request.x.shape[1:],
                                                                             config, generator)
    # A set whose predictions already sit in one class (a single instance's held examples mostly keep
    # its class) says nothing about collapse: only a round that *puts* them there has collapsed.
    share_before = _top_share(work, sentinel)

    # --- optimise -----------------------------------------------------------------------------------
    projector = (memory.projector(work, x, config.memory_min_free)
                 if memory is not None and request.kind != "forget_class" else None)
    params = _trainable(work, request, config, num_classes)
    if projector is not None and projector.frozen:
        # A layer the memory keeps fixed for the round leaves the optimiser and the backward pass: its
        # gradient would be thrown away after every step, yet it would count in the held/forget balance
        # (and in a continual round the convolutions are the frozen ones: the backward stops above them).
        fixed = {id(p): p for p in projector.frozen_parameters()}
        for p in fixed.values():
            p.requires_grad_(False)
        params = [p for p in params if id(p) not in fixed]
    opt, outcome, reason = None, None, None
    if not params:
        outcome = "budget_exhausted"
        reason = "the subspace memory leaves no layer free to move: the memory is full for these instances"
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    trajectory: list[TrajectoryPoint] = []

    tracking_s = 0.0   # the benchmark's trajectory evaluations: instrumentation, not the round's work

    def record(step: int, acc: float) -> None:
        nonlocal tracking_s
        t = time.perf_counter()
        tracked = None
        if track is not None:
            tracked = float((predict(work, track[0]) == track[1]).float().mean())
        trajectory.append(TrajectoryPoint(step, acc, tracked))
        tracking_s += time.perf_counter() - t

    if track is not None and track_every > 0:
        record(0, acc0)
    acc = acc0
    steps = 0
    # Per-instance dual variables: an instance that resists gets a growing share of the push, so
    # easy instances flip with a gentle step and only the hard ones pay for more (forget_boost = 1:
    # a plain sum, as in L2UL).
    inst_w = torch.ones(x.shape[0], device=device)
    adv_pos = 0
    t_opt, tracked_before_opt = time.perf_counter(), tracking_s
    if satisfied:
        outcome, reason = _success_outcome(request.kind), None
    # Unless BatchNorm trains (bn_train), the training forward runs in eval mode: a step's forward
    # on the instances is the eval forward of the weights the previous step left, so it serves that
    # step's stopping check and saves a forward per step (bit-identical to a separate eval pass).
    reuse = not config.bn_train
    pending = False     # an update whose stopping check has not run yet

    def after_update(logits_eval: torch.Tensor) -> tuple[str, str | None] | None:
        """The per-step checks on the weights an update left: stopping rule, push growth, health."""
        nonlocal acc, inst_w
        acc = _accuracy_of(logits_eval[:n_req].argmax(1).cpu(), request)
        still = _still_active(logits_eval, labels, towards_d, request.kind, config)
        if config.forget_boost > 1.0:
            inst_w = torch.where(still, inst_w * config.forget_boost, inst_w)
        if track is not None and track_every > 0 and steps % track_every == 0:
            record(steps, acc)
        if progress is not None:
            progress(steps, config.max_steps, acc)
        if steps % config.check_every == 0 and not _finite(work):
            return "diverged", f"non-finite weights at step {steps}"
        if _stop_reached(acc, request, config) and not (_margin_stop(request, config) and bool(still[:n_req].any())):
            return _success_outcome(request.kind), None
        return None

    while outcome is None and steps < config.max_steps:
        work.train(config.bn_train)
        logits_f = work(x)
        if pending:
            pending = False
            verdict = after_update(logits_f.detach())
            if verdict is not None:
                outcome, reason = verdict
                break
        if should_abort is not None and should_abort():
            outcome, reason = "aborted", "the round was aborted"
            break
        steps += 1
        if relax_at is not None and steps > relax_at and relaxed_at is None:
            adv_logits, adv_soft, relaxed_at = own_logits, F.softmax(own_logits, 1), steps - 1
        if config.mask_forgotten:
            with torch.no_grad():
                active = _still_active(logits_f, labels, towards_d, request.kind, config)
        else:
            active = torch.ones_like(labels, dtype=torch.bool)
        loss_f = forget_term(logits_f, labels, towards_d, active, config,
                             inst_w if config.forget_boost > 1.0 else None, towards_ce=method.towards_ce,
                             margin=config.class_margin if request.kind == "forget_class" else None)
        loss = loss_f
        if adv_x is not None:
            idx = torch.arange(adv_pos, adv_pos + config.adv_batch, device=device) % adv_x.shape[0]
            adv_pos += config.adv_batch
            logits_a = work(adv_x[idx])
            if config.adv_loss == "ce":
                loss_a = F.cross_entropy(logits_a, adv_y[idx])
            elif config.adv_loss == "kl":
                loss_a = F.kl_div(F.log_softmax(logits_a, 1), adv_soft[idx], reduction="batchmean")
            else:
                loss_a = held_logit_term(logits_a, adv_logits[idx], request.forget_class)
            if config.adv_weight is None:   # L2UL: per-sample mean over the union batch
                b_f, b_a = x.shape[0], idx.shape[0]
                loss = (b_f * loss_f + b_a * loss_a) / (b_f + b_a)
            else:
                loss = loss_f + config.adv_weight * loss_a
        penalty = None if regulariser is None else regulariser.penalty(work)
        if penalty is not None:
            loss = loss + penalty
        if not math.isfinite(float(loss.detach())):
            outcome, reason = "diverged", f"non-finite loss at step {steps}"
            break
        opt.zero_grad(set_to_none=True)
        if config.held_balance > 0 and adv_x is not None and config.adv_weight is not None:
            _balanced_backward(loss_f, loss_a, params, config.adv_weight, config.held_balance, penalty)
        else:
            loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        if projector is not None:
            projector.before()
        opt.step()
        if projector is not None:
            projector.after()
        if reuse:
            pending = True
            continue
        with eval_mode(work):
            verdict = after_update(work(x))
        if verdict is not None:
            outcome, reason = verdict
    if pending and outcome is None:   # the budget ran out: check the last update's weights
        with eval_mode(work):
            verdict = after_update(work(x))
        if verdict is not None:
            outcome, reason = verdict
    optimise_s = time.perf_counter() - t_opt - (tracking_s - tracked_before_opt)
    if outcome is None:
        outcome = "budget_exhausted"
        reason = f"forget accuracy {acc:.3f} after the step budget of {config.max_steps}"
    if outcome in ("forgotten", "relabelled") and not _finite(work):
        outcome, reason = "diverged", "non-finite weights"
    if outcome in ("forgotten", "relabelled") and _collapsed(work, sentinel, config.collapse_share, share_before):
        outcome, reason = "collapsed", f"one class takes >= {config.collapse_share:.0%} of the sentinel predictions"
    # A round that took no step left the model as it found it: whatever that model predicts, the round did not do it.
    elif outcome == "forgotten" and steps > 0 and _forget_set_collapsed(work, request, config.collapse_share):
        outcome, reason = "collapsed", (f"one class takes >= {config.collapse_share:.0%} of the forget-set "
                                        "predictions though their labels are mixed")
    if track is not None and track_every > 0 and (not trajectory or trajectory[-1].step != steps):
        record(steps, acc)
    acc_final, pred_after = _forget_accuracy(work, request)
    work.eval()
    return RoundResult(
        outcome=outcome, reason=reason, method=method.name, config=config, steps=steps, kind=request.kind,
        held_fallback_step=relaxed_at,
        frozen_layers=tuple(sorted(projector.frozen)) if projector is not None else (),
        attack_s=attack_s, optimise_s=optimise_s, wall_s=time.perf_counter() - wall0 - tracking_s,
        tracking_s=tracking_s,
        acc_forget=acc_final, predictions_before=pred_before, predictions_after=pred_after,
        state={k: v.detach().cpu().clone() for k, v in work.state_dict().items()},
        attack_example_iterations=attack_stats[0], attack_full_iterations=attack_stats[1],
        attack_success=attack_stats[2],
        adversarial_examples=n_adv,
        anchor_examples=0 if adv_x is None else int(adv_x.shape[0]) - n_adv,
        trajectory=trajectory,
    )
