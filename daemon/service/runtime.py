"""One live model inside the daemon: its weights and session, its probe set, and how a round runs on it.

No Kafka and no ledger here: this layer turns accepted requests into an engine round, gates it on
retention, and writes the version to the registry; the daemon decides when and records the outcome.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from daemon import registry
from daemon.registry import model_store
from daemon.data.sources import Source, builtin_sources, load_dataset
from daemon.engine.config import preset
from daemon.engine.evaluate import param_drift_l2, predict, prediction_flip_ratio
from daemon.engine.importance import ImportanceRegulariser
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import RoundResult
from daemon.service.codec import DecodedRequest, ModelSpec
from daemon.service.config import ModelSection, RoundsSection, parse_probe

__all__ = ["Candidate", "ModelRuntime", "PendingRequest", "RuntimeError_"]

log = structlog.get_logger("unlearnd.runtime")


class RuntimeError_(RuntimeError):  # noqa: N801 - not the builtin
    """A model cannot be loaded or is inconsistent with its configuration."""


@dataclass
class PendingRequest:
    """An accepted request waiting for its round (its data lives only here, in memory)."""

    decoded: DecodedRequest
    topic: str
    partition: int
    offset: int
    received_at: float          # wall clock (epoch seconds)
    labels: list[int]           # the request's labels, or the model's predictions at intake
    targets: list[int] | None

    @property
    def request_id(self) -> str:
        return self.decoded.request_id

    @property
    def size(self) -> int:
        return len(self.decoded.instances)

    def group(self) -> tuple[str, int | None]:
        """Requests that can share a round: the same kind (and, for forget_class, the same class)."""
        return self.decoded.kind, self.decoded.forget_class


@dataclass
class Candidate:
    """A round's outcome before anything is durable."""

    requests: list[PendingRequest]
    result: RoundResult
    importance: dict[str, torch.Tensor] | None
    passed: bool
    reason: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    probe_pred: torch.Tensor | None = None


class ModelRuntime:
    """Everything the daemon keeps about one model."""

    def __init__(self, section: ModelSection, registry_dir: Path, rounds: RoundsSection) -> None:
        self.section = section
        self.name = section.name
        self.registry_dir = registry_dir
        self.rounds = rounds
        self.splits = load_dataset(section.dataset, Path(section.data_root) if section.data_root else None)
        self.sources: dict[str, Source] = builtin_sources(self.splits)
        source, start, end = parse_probe(section.probe)
        if source not in self.sources:
            raise RuntimeError_(f"models.{self.name}.probe: unknown source {source!r} "
                                f"(known: {', '.join(self.sources)})")
        px, py = self.sources[source]
        if end > len(px):
            raise RuntimeError_(f"models.{self.name}.probe: {section.probe} runs past the end of {source} "
                                f"({len(px)} items)")
        self.probe_x, self.probe_y = px[start:end].clone(), py[start:end].clone()
        self.live: model_store.LiveModel | None = None
        self.intake_model: nn.Module | None = None
        self.original_probe_pred: torch.Tensor | None = None
        self.current_probe_pred: torch.Tensor | None = None
        self.forgotten_classes: set[int] = set()

    # -- loading ------------------------------------------------------------------------------------
    def ensure_model(self, pretrain: Callable[[ModelRuntime], None]) -> None:
        if registry.latest_version(self.registry_dir, self.name) is None:
            if self.section.pretrain_epochs <= 0:
                raise RuntimeError_(f"model {self.name!r} has no version in {self.registry_dir} and "
                                    f"models.pretrain_epochs is 0: publish one first (unlearnd pretrain)")
            pretrain(self)
        self.reload()

    def reload(self) -> None:
        """Load LATEST (after a restart, a rollback, or a version another daemon published)."""
        registry.clean_temporaries(self.registry_dir, self.name)
        live = model_store.load_live(self.registry_dir, self.name, device=self.rounds.device)
        if live.input_shape != tuple(self.splits.train_x.shape[1:]):
            raise RuntimeError_(f"model {self.name!r} takes inputs {live.input_shape}, but dataset "
                                f"{self.section.dataset} has {tuple(self.splits.train_x.shape[1:])}")
        live.session.accumulation = self.rounds.accumulation
        live.session.memory.energy = self.rounds.memory_energy
        live.session.memory_copies = self.rounds.memory_copies
        self.live = live
        self.forgotten_classes = set((live.info.manifest.get("metrics") or {}).get("forgotten_classes", []))
        self.intake_model = copy.deepcopy(live.model).cpu().eval()
        original = copy.deepcopy(live.model)
        with torch.no_grad():
            for n, p in original.named_parameters():
                p.copy_(live.session.original[n].to(p.device))
        self.original_probe_pred = predict(original, self.probe_x).cpu()
        self.current_probe_pred = predict(live.model, self.probe_x).cpu()

    def is_current(self) -> bool:
        return self.live is not None and registry.latest_version(self.registry_dir, self.name) == self.live.version

    @property
    def spec(self) -> ModelSpec:
        assert self.live is not None
        return ModelSpec(name=self.name, input_shape=self.live.input_shape, num_classes=self.live.num_classes,
                         sources=self.sources)

    @property
    def version(self) -> int:
        assert self.live is not None
        return self.live.version

    def predict_at_intake(self, x: torch.Tensor) -> list[int]:
        """The published model's predictions (never the weights a running round is changing)."""
        assert self.intake_model is not None
        return [int(v) for v in predict(self.intake_model, x)]

    def retained_mask(self, extra: int | None = None) -> torch.Tensor:
        """Probe items of the classes the model should still recognise (forgotten classes are out)."""
        gone = self.forgotten_classes | ({extra} if extra is not None else set())
        if not gone:
            return torch.ones_like(self.probe_y, dtype=torch.bool)
        return ~torch.isin(self.probe_y, torch.tensor(sorted(gone), dtype=self.probe_y.dtype))

    def _accuracy(self, pred: torch.Tensor, mask: torch.Tensor) -> float:
        if not bool(mask.any()):
            return float("nan")
        return float((pred[mask] == self.probe_y[mask]).float().mean())

    def probe_accuracy(self, reference: str = "current") -> float:
        """Retention on the retained classes, for the live (``current``) or the ``original`` weights."""
        pred = self.current_probe_pred if reference == "current" else self.original_probe_pred
        assert pred is not None
        return self._accuracy(pred, self.retained_mask())

    # -- a round ------------------------------------------------------------------------------------
    def build_request(self, batch: Sequence[PendingRequest]) -> ForgetRequest:
        kind, forget_class = batch[0].group()
        x = torch.stack([inst.x for p in batch for inst in p.decoded.instances]).float()
        labels = torch.tensor([lab for p in batch for lab in p.labels], dtype=torch.int64)
        targets = None
        if kind == "relabel":
            targets = torch.tensor([t for p in batch for t in (p.targets or [])], dtype=torch.int64)
        return ForgetRequest(kind=kind, x=x, labels=labels, targets=targets, forget_class=forget_class)

    def run_round(self, batch: Sequence[PendingRequest], should_abort: Callable[[], bool]) -> Candidate:
        assert self.live is not None
        request = self.build_request(batch)
        config = preset(self.rounds.preset, self.rounds.method, request.kind)
        if self.rounds.held_impressions:
            config = config.with_overrides(held_impressions=self.rounds.held_impressions)
        result, importance = self.live.session.run_round(request, method=self.rounds.method, config=config,
                                                         sentinel=self.probe_x, should_abort=should_abort,
                                                         commit=False)
        if not result.succeeded:
            reason = f"{result.outcome}" + (f": {result.reason}" if result.reason else "")
            return Candidate(list(batch), result, importance, False, reason,
                             {"forget_accuracy": result.acc_forget})
        candidate_model = copy.deepcopy(self.live.model)
        candidate_model.load_state_dict(result.state)
        probe_pred = predict(candidate_model, self.probe_x).cpu()
        mask = self.retained_mask(request.forget_class)
        acc = self._accuracy(probe_pred, mask)
        original_acc = self._accuracy(self.original_probe_pred, mask)
        metrics = {
            "forget_accuracy": result.acc_forget,
            "probe_accuracy_before": self._accuracy(self.current_probe_pred, mask),
            "probe_accuracy_after": acc,
            "probe_accuracy_original": original_acc,
            "param_drift_l2_original": param_drift_l2(_params(candidate_model), self.live.session.original),
            "param_drift_l2_previous": param_drift_l2(_params(candidate_model), _params(self.live.model)),
            "prediction_flip_ratio_original": prediction_flip_ratio(self.original_probe_pred, probe_pred),
            "prediction_flip_ratio_previous": prediction_flip_ratio(self.current_probe_pred, probe_pred),
            "importance_density_ratio": (ImportanceRegulariser(importance, importance, 1.0).density()
                                         if importance else 0.0),
        }
        floor = original_acc - self.rounds.retention_max_drop
        if not acc >= floor:
            return Candidate(list(batch), result, importance, False,
                             f"retention gate: probe accuracy {acc:.4f} is below {floor:.4f} (original "
                             f"{original_acc:.4f} - {self.rounds.retention_max_drop})", metrics)
        if request.forget_class is not None:
            metrics["forgotten_classes"] = sorted(self.forgotten_classes | {request.forget_class})
        elif self.forgotten_classes:
            metrics["forgotten_classes"] = sorted(self.forgotten_classes)
        return Candidate(list(batch), result, importance, True, None, metrics, probe_pred)

    def publish(self, candidate: Candidate, round_id: str, method: dict[str, Any]) -> registry.VersionInfo:
        """Adopt the candidate and write it as the next version (atomic; LATEST moves last)."""
        assert self.live is not None and candidate.passed
        live = self.live
        previous = live.session.snapshot()
        live.session.commit(candidate.result, candidate.importance)
        try:
            info = model_store.publish(
                self.registry_dir, self.name, copy.deepcopy(live.model).cpu(), live.session, arch=live.arch,
                input_shape=live.input_shape, classes=live.classes, parent=live.version,
                dataset=self.section.dataset, round_id=round_id,
                request_ids=[p.request_id for p in candidate.requests], method=method,
                metrics={k: v for k, v in candidate.metrics.items() if v == v})   # NaN is not JSON
        except BaseException:
            live.session.undo(previous)          # the live model and session stay what LATEST says
            raise
        live.info = info
        self.forgotten_classes = set(candidate.metrics.get("forgotten_classes", []))
        self.intake_model = copy.deepcopy(live.model).cpu().eval()
        self.current_probe_pred = candidate.probe_pred
        return info


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters()}
