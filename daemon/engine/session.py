"""Continual unlearning: the state carried from round to round, and its exact save/restore.

A session owns the live model, the original weights (for drift and relapse reports, and as the
outputs later rounds' held examples keep: ``UnlearnConfig.hold_at``), the importance plugin with the
*accumulated* penalty weights (``daemon.engine.importance_plugin``) and the subspace memory of earlier
rounds (``daemon.engine.subspace``). The paper's
continual protocol is not public; the accumulation rule is a setting
(``daemon.engine.importance.ACCUMULATIONS``) chosen by benchmark, and so are the memory's energy
threshold and what the held examples keep.
Every round draws its randomness from ``(seed, round index)``, so a session restored from its saved
state continues bit-identically to one that never stopped.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from daemon.engine.anchors import deformations
from daemon.engine.config import PRESETS, UnlearnConfig
from daemon.engine.importance_plugin import ImportancePlugin
from daemon.engine.kinds import get_kind
from daemon.engine.methods import get_method
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import RoundResult, run_round
from daemon.engine.protection import Protection, protection_report
from daemon.engine.subspace import SubspaceMemory

__all__ = ["DEFAULT_ACCUMULATION", "DEFAULT_MEMORY_COPIES", "DEFAULT_MEMORY_ENERGY", "UnlearningSession"]

log = logging.getLogger(__name__)

DEFAULT_ACCUMULATION = "max"
#: the memory keeps (all but 1e-5 of) the forgotten instances' own input directions at every layer:
#: later rounds then cannot move them back (relapse 0) and may hold their examples at the original
#: model's outputs (mnist_notes.md, session 7)
DEFAULT_MEMORY_ENERGY = 0.99999
#: affine copies per instance that, with the instances, define what a committed round protects
#: (0: the instances alone; 16 with energy 0.97 was the session-5 memory)
DEFAULT_MEMORY_COPIES = 0
_STATE_VERSION = 2          # 1: no subspace memory (restored with an empty one)
# what states saved before a setting was recorded ran with, so they continue as they would have
_V1_MEMORY_ENERGY = 0.97
_V2_MEMORY_COPIES = 16


#: what :meth:`UnlearningSession.snapshot` returns: live weights, rounds applied, importance, memory, reference
Snapshot = tuple[dict[str, torch.Tensor], int, "dict[str, torch.Tensor] | None", SubspaceMemory,
                 "dict[str, torch.Tensor] | None"]


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
        memory_copies: affine copies of each instance the memory protects beside the instance.
        head: the classifier head's module name for class rounds scoped to its row (None: found by
            output width; ``daemon.engine.heads``). The operator's setting, never a request's.

    The first round logs, once per session, which parameters the subspace memory protects and which it
    leaves out, with the reason per layer type (:attr:`protection`).
    """

    def __init__(self, model: nn.Module, *, num_classes: int, accumulation: str = DEFAULT_ACCUMULATION,
                 decay: float = 0.5, seed: int = 0, memory_energy: float = DEFAULT_MEMORY_ENERGY,
                 memory_copies: int = DEFAULT_MEMORY_COPIES, head: str | None = None) -> None:
        self.importance_plugin = ImportancePlugin(accumulation, decay)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if memory_copies < 0:
            raise ValueError(f"memory_copies must be >= 0, got {memory_copies}")
        self.model = model
        self.num_classes = num_classes
        self.head = head
        self._protection: Protection | None = None     # computed (and logged) by the first round
        self.seed = seed
        self.rounds_applied = 0
        self.original = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        # what held examples are kept at (config.hold_at "original"): the original weights until a class
        # round commits; a class round changes the model everywhere by design, so it becomes the reference
        # (else later rounds would hold examples of the forgotten class at the original outputs: relearning)
        self.reference: dict[str, torch.Tensor] | None = None
        self.memory = SubspaceMemory(memory_energy)
        self.memory_copies = memory_copies
        # the memory a successful, not yet committed round would leave (never raw inputs)
        self._pending: tuple[RoundResult, SubspaceMemory] | None = None

    @property
    def importance(self) -> dict[str, torch.Tensor] | None:
        """The accumulated importance penalty weights of the committed rounds (None before the first)."""
        return self.importance_plugin.weights

    @property
    def protection(self) -> Protection:
        """Which parameters the subspace memory protects and which it leaves out, and why."""
        if self._protection is None:
            self._protection = protection_report(self.model)
        return self._protection

    @property
    def accumulation(self) -> str:
        return self.importance_plugin.accumulation

    @accumulation.setter
    def accumulation(self, mode: str) -> None:
        self.importance_plugin.accumulation = mode

    @property
    def decay(self) -> float:
        return self.importance_plugin.decay

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
        heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
        reference_scores: torch.Tensor | None = None,
    ) -> tuple[RoundResult, dict[str, torch.Tensor] | None]:
        """Run one round; on success (and ``commit``) the live model and the importance move on.

        Returns the result and the accumulated importance the round used (None for methods without
        importance). ``heldout``: labelled data the model never trained on (the daemon's probe set), the
        reference of the round's membership check (``daemon.engine.unseen``); ``reference_scores``: the
        instances' scores under reference models that never trained on them, the per-example check used instead. With ``commit=False`` the caller applies it later with :meth:`commit`, e.g.
        after a retention gate.
        """
        config = config or PRESETS["default"]
        if self._protection is None and self.memory.enabled:
            log.info("%s", self.protection.describe())
        m = get_method(method)
        gen = self.generator()
        reference = self.reference_model() if config.hold_at == "original" else None
        # the round validates the request (before it estimates any importance) and leaves the plugin as it was
        result = run_round(self.model, request, m, config, generator=gen, num_classes=self.num_classes,
                           importance=self.importance_plugin, memory=self.memory, reference=reference,
                           sentinel=sentinel, track=track,
                           track_every=track_every, progress=progress, should_abort=should_abort,
                           head=self.head, heldout=heldout, reference_scores=reference_scores)
        self._pending = None
        if result.succeeded and self.memory.enabled and get_kind(request.kind).instance_scoped:
            t0 = time.perf_counter()
            self._pending = (result, self._remember(request, result, gen))
            result.memory_s = time.perf_counter() - t0
            result.wall_s += result.memory_s      # part of what the round costs the caller
        if commit and result.succeeded:
            self.commit(result, result.importance)
        return result, result.importance

    def reference_model(self) -> nn.Module:
        """The model whose outputs the held examples keep: the original weights, or those of the last
        committed class round (buffers as live: a round trains no BatchNorm statistics unless
        ``bn_train``), in eval mode."""
        weights = self.original if self.reference is None else self.reference
        model = copy.deepcopy(self.model).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name].to(p.device))
        return model

    def _remember(self, request: ForgetRequest, result: RoundResult, generator: torch.Generator) -> SubspaceMemory:
        """The memory extended by what the unlearned model computes on the instances (and their copies)."""
        after = copy.deepcopy(self.model)
        after.load_state_dict(result.state)
        x = request.x
        if self.memory_copies:
            x = torch.cat([x, deformations(request.x, self.memory_copies, generator)])
        return self.memory.extended(after, x)

    def commit(self, result: RoundResult, importance: Mapping[str, torch.Tensor] | None) -> None:
        """Adopt a successful round's weights (its importance, and the memory it leaves) as the live state."""
        if not result.succeeded:
            raise ValueError(f"refusing to commit a round that ended {result.outcome}")
        self.model.load_state_dict(result.state)
        if not get_kind(result.kind).instance_scoped:
            self.reference = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}
        if importance is not None:
            self.importance_plugin.consolidate(importance)
        if self._pending is not None and self._pending[0] is result:
            self.memory = self._pending[1]
        self._pending = None
        self.rounds_applied += 1

    def snapshot(self) -> Snapshot:
        """What :meth:`commit` changes, for a caller that must undo it (a publish that failed)."""
        weights = {n: t.detach().clone() for n, t in self.model.state_dict().items()}
        return weights, self.rounds_applied, self.importance, self.memory, self.reference

    def undo(self, snapshot: Snapshot) -> None:
        weights, self.rounds_applied, self.importance_plugin.weights, self.memory, self.reference = snapshot
        self.model.load_state_dict(weights)

    # -- persistence ---------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (for safetensors) and JSON-able metadata; the live weights are saved separately."""
        tensors = {f"original/{n}": t for n, t in self.original.items()}
        if self.importance is not None:
            tensors.update({f"importance/{n}": t for n, t in self.importance.items()})
        if self.reference is not None:
            tensors.update({f"reference/{n}": t for n, t in self.reference.items()})
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
            "memory_copies": self.memory_copies,
        }
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    @classmethod
    def restore(cls, model: nn.Module, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *,
                head: str | None = None) -> UnlearningSession:
        """The session as :meth:`state` saved it; ``model`` must already hold the live weights. ``head``
        is the operator's setting (not saved in the state), as for the constructor."""
        version = meta.get("state_version")
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"unsupported session state version {version!r}")
        session = cls(model, num_classes=int(meta["num_classes"]), accumulation=str(meta["accumulation"]),
                      decay=float(meta["decay"]), seed=int(meta["seed"]),
                      memory_energy=float(meta.get("memory_energy", _V1_MEMORY_ENERGY)),
                      memory_copies=int(meta.get("memory_copies", _V2_MEMORY_COPIES)), head=head)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        original = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("original/")}
        _check_matches("original weights", original, shapes, exact=True)
        session.original = {n: t.clone() for n, t in original.items()}
        if meta.get("has_importance"):
            imp = {k.split("/", 1)[1]: v.clone() for k, v in tensors.items() if k.startswith("importance/")}
            # importance covers exactly the trainable parameters (mas_importance skips frozen ones)
            trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
            _check_matches("importance", imp, trainable, exact=True)
            session.importance_plugin.weights = imp
        reference = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("reference/")}
        if reference:
            _check_matches("reference weights", reference, shapes, exact=True)
            session.reference = {n: t.clone() for n, t in reference.items()}
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
