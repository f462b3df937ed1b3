"""Runs the unlearning benchmark: single rounds, continual rounds and class forgetting.

Every row has exactly ``ROW_FIELDS``; the trajectories behind the trade-off plot (forget accuracy
against test accuracy along each round) and per-row extras go to a side file, so the rows stay the
schema the issue fixes. Results are written after every row (atomically), so a long run that is
stopped keeps what it measured and ``--resume`` skips rows already present.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daemon.bench.evaluation import ROW_FIELDS, EvalContext, drift_report, evaluate_model
from daemon.data.splits import DatasetSplits
# `preset` is also the run loop's name for a preset's name, hence the alias
from daemon.engine.config import PRESETS, UnlearnConfig, method_settings, preset as preset_config
from daemon.engine.evaluate import accuracy, predict
from daemon.engine.kinds import ForgetInstances, get_kind
from daemon.engine.methods import get_method
from daemon.engine.models import build_model
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import RoundResult
from daemon.engine.session import DEFAULT_ACCUMULATION, DEFAULT_MEMORY_COPIES, DEFAULT_MEMORY_ENERGY, UnlearningSession
from daemon.engine.training import TrainConfig, train_classifier
from daemon.errors import UsageError
from daemon.registry import atomic_write_bytes

__all__ = ["BenchPlan", "machine_info", "run_benchmark"]

PAPER_METHODS = ("neggrad", "adv", "adv_imp")
# the retrain oracle's test accuracy is measured every this many steps (MNIST: ~470 steps an epoch)
RETRAIN_CURVE_EVERY = 50


@dataclass
class BenchPlan:
    """What to run. ``continual`` is (rounds, k) or None; ``kinds`` names from ``KINDS``."""

    dataset: str
    arch: str
    methods: Sequence[str]
    ks: Sequence[int]
    seeds: Sequence[int]
    kinds: Sequence[str] = (ForgetInstances.name,)
    presets: Sequence[str] = ("default", "paper")
    continual: tuple[int, int] | None = None
    accumulations: Sequence[str] = ("none", "sum", "max", "decayed")
    forget_class_examples: int = 64
    forget_classes: Sequence[int] = ()
    train: TrainConfig = field(default_factory=TrainConfig)
    track_size: int = 2000
    track_every: int = 10
    overrides: dict[str, Any] = field(default_factory=dict)


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
    }


class _Results:
    """The JSON files of a run, rewritten atomically after every row."""

    def __init__(self, out: Path, dataset: str, machine: dict, settings: dict, resume: bool) -> None:
        self.path = out / f"{dataset}.json"
        self.extra_path = out / f"{dataset}_trajectories.json"
        self.doc: dict[str, Any] = {"machine": machine, "settings": settings, "rows": []}
        self.extra: dict[str, Any] = {}
        settings["runs"] = [_run_summary(settings)]
        if resume and self.path.exists():
            old = json.loads(self.path.read_text())
            self.doc["rows"] = old.get("rows", [])
            # one results file gathers several invocations: keep what each of them ran
            settings["runs"] = old.get("settings", {}).get("runs", []) + settings["runs"]
            if self.extra_path.exists():
                self.extra = json.loads(self.extra_path.read_text())

    @staticmethod
    def key(row: dict) -> str:
        return "|".join(str(row[f]) for f in ("method", "preset", "kind", "protocol", "k", "seed", "round",
                                              "accumulation"))

    def has(self, **key: Any) -> bool:
        probe = {f: key.get(f) for f in ("method", "preset", "kind", "protocol", "k", "seed", "round", "accumulation")}
        wanted = self.key(probe)
        return any(self.key(r) == wanted for r in self.doc["rows"])

    def add(self, row: dict, extra: dict | None) -> None:
        missing = set(ROW_FIELDS) - set(row)
        if missing:
            raise ValueError(f"benchmark row lacks {sorted(missing)}")
        clean = {f: row[f] for f in ROW_FIELDS}
        self.doc["rows"] = [r for r in self.doc["rows"] if self.key(r) != self.key(clean)] + [clean]
        if extra is not None:
            self.extra[self.key(clean)] = extra
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(self.doc, indent=1, allow_nan=False, default=_nan_none) + "\n").encode())
        atomic_write_bytes(self.extra_path, (json.dumps(self.extra, allow_nan=False, default=_nan_none) + "\n").encode())


def _run_summary(settings: dict) -> dict:
    keys = ("methods", "k", "seeds", "kinds", "continual", "accumulations", "overrides")
    return {k: settings.get(k) for k in keys} | {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _nan_none(o: Any) -> Any:
    raise TypeError(f"not JSON: {type(o)}")


def _clean(v: Any) -> Any:
    """JSON-safe: NaN/inf → None, floats rounded, containers cleaned recursively."""
    if isinstance(v, float):
        return round(v, 6) if v == v and abs(v) != float("inf") else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _fresh(arch: str, splits: DatasetSplits, state: dict, device: str) -> torch.nn.Module:
    c = splits.train_x.shape[1]
    model = build_model(arch, num_classes=len(splits.classes), input_shape=tuple(splits.train_x.shape[1:]),
                        mean=[0.0] * c, std=[1.0] * c)
    model.load_state_dict(state)
    return model.to(device).eval()


def pretrain(arch: str, splits: DatasetSplits, config: TrainConfig, device: str,
             progress: Callable[[int, int, dict], None] | None = None,
             exclude: torch.Tensor | None = None, curve: list[list[float]] | None = None,
             curve_every: int = RETRAIN_CURVE_EVERY) -> tuple[torch.nn.Module, float]:
    """Train a fresh classifier (``exclude``: training indices left out — the retrain oracle); returns it and
    its training seconds.

    ``curve``, when given, is filled with ``[training seconds, step, test accuracy]`` every ``curve_every``
    steps and after the last: "retrain to the same test accuracy" is read off it. The evaluations are not
    counted in the seconds.
    """
    mean, std = splits.mean_std()
    # the initial weights are part of the recipe: seeded here, one seed gives one model whatever the process
    # drew before (unseeded, the bench and a script got different models from the same recipe, and ten
    # continual rounds cost them 2.2 vs 6 pp: mnist_notes.md, session 9)
    torch.manual_seed(config.seed)
    model = build_model(arch, num_classes=len(splits.classes), input_shape=tuple(splits.train_x.shape[1:]),
                        mean=mean, std=std).to(device)
    x, y = splits.train_x, splits.train_y
    if exclude is not None and exclude.numel():
        keep = torch.ones(y.shape[0], dtype=torch.bool)
        keep[exclude] = False
        x, y = x[keep], y[keep]
    paused = 0.0

    def step_done(step: int, total: int, info: dict) -> None:
        nonlocal paused
        if progress is not None:
            progress(step, total, info)
        if curve is not None and (step % curve_every == 0 or step == total):
            t = time.perf_counter()
            acc = accuracy(model, splits.test_x, splits.test_y)
            curve.append([round(t - t0 - paused, 3), step, acc])
            paused += time.perf_counter() - t

    t0 = time.perf_counter()
    train_classifier(model, x, y, config, progress=step_done)
    return model, time.perf_counter() - t0 - paused


def forget_indices(n_train: int, k: int, seed: int) -> torch.Tensor:
    """L2UL's sampling: ``randperm(N)[:k]`` under ``seed`` (a uniform mix of classes)."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:k]


def make_request(kind: str, splits: DatasetSplits, idx: torch.Tensor, seed: int,
                 forget_class: int | None = None) -> ForgetRequest:
    """A request of ``kind`` for the training instances ``idx``: a kind that names targets gets a random other
    class per instance (seeded by ``seed``), a kind that names a class gets ``forget_class``."""
    x, y = splits.train_x[idx], splits.train_y[idx]
    request_kind = get_kind(kind)
    targets = None
    if request_kind.names_targets:
        gen = torch.Generator().manual_seed(10_007 + seed)
        targets = (y + torch.randint(1, len(splits.classes), y.shape, generator=gen)) % len(splits.classes)
    return ForgetRequest(kind, x, y, targets=targets, forget_class=forget_class if request_kind.names_class else None)


def run_benchmark(plan: BenchPlan, splits: DatasetSplits, base_state: dict, *, out: Path, device: str = "cpu",
                  resume: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Run ``plan`` against the pre-trained ``base_state``; returns the results file."""
    for m in plan.methods:
        get_method(m)
    for p in plan.presets:
        if p not in PRESETS:
            raise ValueError(f"unknown preset {p!r}")
    run = _Run(plan, splits, base_state, out=out, device=device, resume=resume, log=log or _print)
    run.single_rounds()
    run.class_rounds()
    if plan.continual:
        run.continual(*plan.continual)
    return run.results.path


def _print(line: str) -> None:
    print(line, flush=True)


def _calibrated(overrides: dict[str, Any], acc_original: float) -> dict[str, Any]:
    """``stop=calibrated`` without a level stops at the model's test accuracy (the issue's calibration:
    forgotten instances classified as well as unseen data, no better and no worse)."""
    if overrides.get("stop") != "calibrated" or "stop_level" in overrides:
        return overrides
    if acc_original >= 1.0:
        raise UsageError("stop=calibrated: the model classifies every test example correctly, so the calibrated "
                         "level (its test accuracy) would end every round before its first step; set stop_level")
    return {**overrides, "stop_level": acc_original}


def _settings(plan: BenchPlan, ctx: EvalContext, overrides: dict[str, Any]) -> dict[str, Any]:
    """What the results file records about how its rows were made."""
    return {
        "dataset": plan.dataset, "arch": plan.arch, "methods": list(plan.methods), "k": list(plan.ks),
        "seeds": list(plan.seeds), "kinds": list(plan.kinds), "presets": {p: PRESETS[p].to_dict() for p in plan.presets},
        "method_settings": {p: method_settings(p) for p in plan.presets},
        "overrides": overrides, "continual": list(plan.continual) if plan.continual else None,
        "accumulations": list(plan.accumulations), "default_accumulation": DEFAULT_ACCUMULATION,
        "memory": {"energy": DEFAULT_MEMORY_ENERGY, "copies": DEFAULT_MEMORY_COPIES},
        "pretrain": plan.train.__dict__, "acc_test_original": ctx.acc_test_original,
        "track": {"set": f"last {plan.track_size} test images", "every_steps": plan.track_every},
        "forget_classes": list(plan.forget_classes), "forget_class_examples": plan.forget_class_examples,
        "mia": f"loss AUC of forget instances vs the first {ctx.mia_holdout} test images",
    }


class _Run:
    """One benchmark run: the plan's protocols against one pre-trained model, each row recorded as it ends."""

    def __init__(self, plan: BenchPlan, splits: DatasetSplits, base_state: dict, *, out: Path, device: str,
                 resume: bool, log: Callable[[str], None]) -> None:
        self.plan, self.splits, self.base_state, self.device, self.log = plan, splits, base_state, device, log
        base = self.fresh()
        acc_original = accuracy(base, splits.test_x, splits.test_y)
        self.ctx = EvalContext(splits.train_x, splits.train_y, splits.test_x, splits.test_y, acc_original)
        self.test_pred0 = predict(base, splits.test_x)
        self.track = (splits.test_x[-plan.track_size:], splits.test_y[-plan.track_size:])
        self.overrides = _calibrated(dict(plan.overrides), acc_original)
        self.results = _Results(out, plan.dataset, machine_info(device), _settings(plan, self.ctx, self.overrides),
                                resume)
        self.results.flush()

    def fresh(self) -> nn.Module:
        return _fresh(self.plan.arch, self.splits, self.base_state, self.device)

    def session(self, seed: int, accumulation: str = DEFAULT_ACCUMULATION) -> UnlearningSession:
        return UnlearningSession(self.fresh(), num_classes=len(self.splits.classes), accumulation=accumulation,
                                 seed=seed)

    def config_for(self, preset_name: str, method: str, kind: str) -> UnlearnConfig:
        cfg = preset_config(preset_name, method, kind)
        return cfg.with_overrides(**self.overrides) if preset_name == "default" and self.overrides else cfg

    def one(self, method: str, preset: str, kind: str, protocol: str, k: int, seed: int, rnd: int,
            accumulation: str | None, session: UnlearningSession | None, request: ForgetRequest, union: torch.Tensor,
            test_pred_before: torch.Tensor, acc_test_before: float) -> dict:
        """One round (or the retrain oracle), evaluated and recorded as a row."""
        plan, ctx = self.plan, self.ctx
        row = {"dataset": plan.dataset, "arch": plan.arch, "method": method, "preset": preset, "kind": kind,
               "protocol": protocol, "k": k, "seed": seed, "round": rnd, "accumulation": accumulation}
        extra: dict[str, Any] = {}
        if session is None:       # the retrain oracle
            curve: list[list[float]] = []
            model, secs = pretrain(plan.arch, self.splits, plan.train, self.device, exclude=union, curve=curve)
            ev = evaluate_model(model, ctx, request, forgotten_union=union, test_pred_before=test_pred_before)
            row.update(steps=None, attack_s=0.0, optimise_s=secs, wall_s=secs, outcome="retrained")
            extra["retrain_curve"] = curve       # [training s, step, test accuracy]: time to a given accuracy
        else:
            before = {n: p.detach().cpu().clone() for n, p in session.model.named_parameters()}
            result, _ = session.run_round(request, method=method, config=self.config_for(preset, method, kind),
                                          track=self.track, track_every=plan.track_every,
                                          sentinel=self.splits.test_x[:2000])
            model = session.model
            if not result.succeeded:   # evaluate what the round produced, though it was not committed
                model = copy.deepcopy(session.model)
                model.load_state_dict(result.state)
            ev = evaluate_model(model, ctx, request, forgotten_union=union, test_pred_before=test_pred_before)
            extra.update(drift_report(model, session.original, before))
            extra.update(_round_extra(result, session))
            row.update(steps=result.steps, attack_s=result.attack_s, optimise_s=result.optimise_s,
                       wall_s=result.wall_s, outcome=result.outcome)
        extra["test_flip_ratio"] = ev.pop("test_flip_ratio")
        row.update(ev)
        row["acc_test_before"] = acc_test_before
        row = {k2: _clean(v) for k2, v in row.items()}
        self.results.add(row, _clean(extra))
        self.log(f"{protocol:9s} {kind:12s} {method:15s} {preset:7s} k={k:<4d} seed={seed} round={rnd} "
                 f"acc={accumulation or '-':7s} -> {row['outcome']:16s} forget={row['acc_forget']} "
                 f"test={row['acc_test']} steps={row['steps']} wall={row['wall_s']}s")
        return row

    def single_rounds(self) -> None:
        """Each instance kind, k and seed: one round per method and preset on a fresh model."""
        plan, splits = self.plan, self.splits
        for kind in [k for k in plan.kinds if not get_kind(k).names_class]:
            for k in plan.ks:
                for seed in plan.seeds:
                    idx = forget_indices(splits.train_y.shape[0], k, seed)
                    request = make_request(kind, splits, idx, seed)
                    for method in plan.methods:
                        presets = plan.presets if method in PAPER_METHODS else ("default",)
                        for preset in presets:
                            if self.results.has(method=method, preset=preset, kind=kind, protocol="single", k=k,
                                                seed=seed, round=1, accumulation=None):
                                continue
                            if method == "retrain" and kind != ForgetInstances.name:   # the oracle only forgets
                                continue
                            session = None if method == "retrain" else self.session(seed)
                            self.one(method, preset, kind, "single", k, seed, 1, None, session, request, idx,
                                     self.test_pred0, self.ctx.acc_test_original)

    def class_rounds(self) -> None:
        """Each class kind, class and seed: one round per method (the k column holds the class)."""
        plan, splits = self.plan, self.splits
        for kind in [k for k in plan.kinds if get_kind(k).names_class]:
            for c in plan.forget_classes:
                for seed in plan.seeds:
                    members = (splits.train_y == c).nonzero().squeeze(1)
                    pick = members[torch.randperm(members.numel(), generator=torch.Generator().manual_seed(seed))]
                    idx = pick[:plan.forget_class_examples]
                    request = make_request(kind, splits, idx, seed, forget_class=c)
                    for method in [m for m in plan.methods if m != "retrain"]:
                        if self.results.has(method=method, preset="default", kind=kind, protocol="single",
                                            k=c, seed=seed, round=1, accumulation=None):
                            continue
                        self.one(method, "default", kind, "single", c, seed, 1, None, self.session(seed), request,
                                 idx, self.test_pred0, self.ctx.acc_test_original)

    def continual(self, rounds: int, k: int) -> None:
        """``rounds`` rounds of ``k`` instances on one session per method, accumulation and seed."""
        plan, splits = self.plan, self.splits
        forget = ForgetInstances.name   # the continual protocol forgets instances, round after round
        for seed in plan.seeds:
            order = forget_indices(splits.train_y.shape[0], rounds * k, seed)
            for method in [m for m in plan.methods if not get_method(m).oracle]:   # retrain has no rounds
                accs = plan.accumulations if get_method(method).uses_importance else (DEFAULT_ACCUMULATION,)
                for acc_mode in accs:
                    # a sequence needs every earlier round's session, so only a complete one is skipped
                    if all(self.results.has(method=method, preset="default", kind=forget, protocol="continual",
                                            k=k, seed=seed, round=r, accumulation=acc_mode)
                           for r in range(1, rounds + 1)):
                        continue
                    session = self.session(seed, acc_mode)
                    acc_before, pred_before = self.ctx.acc_test_original, self.test_pred0
                    for r in range(1, rounds + 1):
                        request = make_request(forget, splits, order[(r - 1) * k:r * k], seed)
                        row = self.one(method, "default", forget, "continual", k, seed, r, acc_mode, session,
                                       request, order[:r * k], pred_before, acc_before)
                        acc_before = row["acc_test"]
                        pred_before = predict(session.model, splits.test_x)


def _round_extra(result: RoundResult, session: UnlearningSession) -> dict[str, Any]:
    """The side file's record of a round beyond its row."""
    return {
        "trajectory": [[p.step, p.acc_forget, p.acc_track] for p in result.trajectory],
        "reason": result.reason,
        "tracking_s": result.tracking_s,   # trajectory evaluations, excluded from wall_s
        "memory_s": result.memory_s,       # subspace memory extension, included in wall_s
        "memory_dims": session.memory.dims(),
        "held_fallback_step": result.held_fallback_step,
        "frozen_layers": list(result.frozen_layers),   # layers the memory kept fixed (memory_min_free)
        "attack": {"example_iterations": result.attack_example_iterations,
                   "full_iterations": result.attack_full_iterations,
                   "success": result.attack_success, "examples": result.adversarial_examples,
                   "anchors": result.anchor_examples},
    }


def parse_list(text: str, cast: Callable[[str], Any] = int) -> list[Any]:
    try:
        return [cast(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise ValueError(f"not a comma-separated list: {text!r}") from exc


def parse_continual(text: str) -> tuple[int, int]:
    try:
        rounds, k = (int(t) for t in text.lower().split("x"))
    except ValueError as exc:
        raise ValueError(f"--continual wants ROUNDSxK, e.g. 10x32; got {text!r}") from exc
    if rounds < 1 or k < 1:
        raise ValueError(f"--continual needs positive rounds and k, got {text!r}")
    return rounds, k
