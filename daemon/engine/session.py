"""Continual unlearning: the state carried from round to round, and its exact save/restore.

A session owns the live model, the original weights (for drift and relapse reports), the
*accumulated* importance penalty weights and the subspace memory of earlier rounds
(``daemon.engine.subspace``). The paper's continual protocol is not public; the accumulation rule is
a setting (``daemon.engine.importance.ACCUMULATIONS``) chosen by benchmark, and so is the memory's
energy threshold.
Every round draws its randomness from ``(seed, round index)``, so a session restored from its saved
state continues bit-identically to one that never stopped.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from daemon.engine.anchors import deformations
from daemon.engine.config import PRESETS, UnlearnConfig
from daemon.engine.importance import ACCUMULATIONS, accumulate, anchor_weights, mas_importance
from daemon.engine.methods import get_method
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import RoundResult, run_round
from daemon.engine.subspace import SubspaceMemory

__all__ = ["DEFAULT_ACCUMULATION", "DEFAULT_MEMORY_ENERGY", "UnlearningSession"]

DEFAULT_ACCUMULATION = "max"
DEFAULT_MEMORY_ENERGY = 0.97
#: affine copies per instance that, with the instances, define what a committed round protects
MEMORY_COPIES = 16
_STATE_VERSION = 2          # 1: no subspace memory (restored with an empty one)


class UnlearningSession:
    """Sequential rounds on one live model.

    Arguments:
        model: the live classifier (normalisation inside, [0, 1] inputs); the session updates it in
            place only when a round succeeds.
        num_classes: number of output classes.
        accumulation: how importance combines across rounds (none, sum, max, decayed).
        decay: the factor of ``decayed`` accumulation.
        seed: base seed; round r draws from ``seed * 1_000_003 + r``.
        memory_energy: the subspace memory's threshold (0: no memory; ``daemon.engine.subspace``).
    """

    def __init__(self, model: nn.Module, *, num_classes: int, accumulation: str = DEFAULT_ACCUMULATION,
                 decay: float = 0.5, seed: int = 0, memory_energy: float = DEFAULT_MEMORY_ENERGY) -> None:
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"unknown accumulation {accumulation!r}; known: {', '.join(ACCUMULATIONS)}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.model = model
        self.num_classes = num_classes
        self.accumulation = accumulation
        self.decay = decay
        self.seed = seed
        self.rounds_applied = 0
        self.original = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        self.importance: dict[str, torch.Tensor] | None = None
        self.memory = SubspaceMemory(memory_energy)
        # the memory a successful, not yet committed round would leave (never raw inputs)
        self._pending: tuple[RoundResult, SubspaceMemory] | None = None

    # -- rounds -------------------------------------------------------------------------------------
    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.rounds_applied)

    def run_round(
        self,
        request: ForgetRequest,
        *,
        method: str = "adv_imp",
        config: UnlearnConfig | None = None,
        sentinel: torch.Tensor | None = None,
        track: tuple[torch.Tensor, torch.Tensor] | None = None,
        track_every: int = 0,
        progress: Callable[[int, int, float], None] | None = None,
        should_abort: Callable[[], bool] | None = None,
        commit: bool = True,
    ) -> tuple[RoundResult, dict[str, torch.Tensor] | None]:
        """Run one round; on success (and ``commit``) the live model and the importance move on.

        Returns the result and the accumulated importance the round used (None for methods without
        importance). With ``commit=False`` the caller applies it later with :meth:`commit`, e.g.
        after a retention gate.
        """
        config = config or PRESETS["default"]
        m = get_method(method)
        request.validate(num_classes=self.num_classes, input_shape=tuple(request.x.shape[1:]))
        gen = self.generator()
        combined = None
        if m.uses_importance:
            current = anchor_weights(mas_importance(self.model, request.x))
            combined = accumulate(self.importance, current, self.accumulation, self.decay)
        self._pending = None
        result = run_round(self.model, request, m, config, generator=gen, num_classes=self.num_classes,
                           importance_weights=combined, memory=self.memory, sentinel=sentinel, track=track,
                           track_every=track_every, progress=progress, should_abort=should_abort)
        if result.succeeded and self.memory.enabled and request.kind != "forget_class":
            t0 = time.perf_counter()
            self._pending = (result, self._remember(request, result, gen))
            result.memory_s = time.perf_counter() - t0
            result.wall_s += result.memory_s      # part of what the round costs the caller
        if commit and result.succeeded:
            self.commit(result, combined)
        return result, combined

    def _remember(self, request: ForgetRequest, result: RoundResult, generator: torch.Generator) -> SubspaceMemory:
        """The memory extended by what the unlearned model computes on the instances and their copies."""
        after = copy.deepcopy(self.model)
        after.load_state_dict(result.state)
        x = torch.cat([request.x, deformations(request.x, MEMORY_COPIES, generator)])
        return self.memory.extended(after, x)

    def commit(self, result: RoundResult, importance: Mapping[str, torch.Tensor] | None) -> None:
        """Adopt a successful round's weights (its importance, and the memory it leaves) as the live state."""
        if not result.succeeded:
            raise ValueError(f"refusing to commit a round that ended {result.outcome}")
        self.model.load_state_dict(result.state)
        if importance is not None:
            self.importance = {n: t.detach().cpu().clone() for n, t in importance.items()}
        if self._pending is not None and self._pending[0] is result:
            self.memory = self._pending[1]
        self._pending = None
        self.rounds_applied += 1

    def snapshot(self) -> tuple[dict[str, torch.Tensor], int, dict[str, torch.Tensor] | None, SubspaceMemory]:
        """What :meth:`commit` changes, for a caller that must undo it (a publish that failed)."""
        weights = {n: t.detach().clone() for n, t in self.model.state_dict().items()}
        return weights, self.rounds_applied, self.importance, self.memory

    def undo(self, snapshot: tuple[dict[str, torch.Tensor], int, dict[str, torch.Tensor] | None, SubspaceMemory]
             ) -> None:
        weights, self.rounds_applied, self.importance, self.memory = snapshot
        self.model.load_state_dict(weights)

    # -- persistence ---------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (for safetensors) and JSON-able metadata; the live weights are saved separately."""
        tensors = {f"original/{n}": t for n, t in self.original.items()}
        if self.importance is not None:
            tensors.update({f"importance/{n}": t for n, t in self.importance.items()})
        tensors.update({f"subspace/{n}": t for n, t in self.memory.tensors().items()})
        meta = {
            "state_version": _STATE_VERSION,
            "num_classes": self.num_classes,
            "accumulation": self.accumulation,
            "decay": self.decay,
            "seed": self.seed,
            "rounds_applied": self.rounds_applied,
            "has_importance": self.importance is not None,
            "memory_energy": self.memory.energy,
        }
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    @classmethod
    def restore(cls, model: nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
                ) -> UnlearningSession:
        """The session as :meth:`state` saved it; ``model`` must already hold the live weights."""
        version = meta.get("state_version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"unsupported session state version {version!r}")
        session = cls(model, num_classes=int(meta["num_classes"]), accumulation=str(meta["accumulation"]),
                      decay=float(meta["decay"]), seed=int(meta["seed"]),
                      memory_energy=float(meta.get("memory_energy", DEFAULT_MEMORY_ENERGY)))
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        original = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("original/")}
        _check_matches("original weights", original, shapes, exact=True)
        session.original = {n: t.clone() for n, t in original.items()}
        if meta.get("has_importance"):
            imp = {k.split("/", 1)[1]: v.clone() for k, v in tensors.items() if k.startswith("importance/")}
            # importance covers exactly the trainable parameters (mas_importance skips frozen ones)
            trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
            _check_matches("importance", imp, trainable, exact=True)
            session.importance = imp
        bases = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("subspace/")}
        if bases:
            session.memory = SubspaceMemory(session.memory.energy, bases)
            session.memory.check(model)
        session.rounds_applied = int(meta["rounds_applied"])
        return session


def _check_matches(what: str, saved: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                   *, exact: bool) -> None:
    """The saved tensors must name the given parameters (all of them when ``exact``), with their shapes."""
    extra = sorted(set(saved) - set(shapes))
    missing = sorted(set(shapes) - set(saved)) if exact else []
    if extra or missing:
        raise ValueError(f"session {what} do not match the model's parameters "
                         f"(unknown: {extra[:3]}, missing: {missing[:3]})")
    for name, t in saved.items():
        if tuple(t.shape) != shapes[name]:
            raise ValueError(f"session {what} for {name} has shape {tuple(t.shape)}, "
                             f"the model's parameter has {shapes[name]}")
