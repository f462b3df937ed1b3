"""One live model inside the daemon: its weights and session, its sources and probe set, and how a round runs on it.

Its sources come from the model's configuration (:func:`open_sources`: the built-in datasets, image folders and
array files, opened lazily: a folder is listed, an array file mapped); the probe set is a slice of one of them,
read once the model's input shape is known (:meth:`ModelRuntime.reload`). Pretraining needs a built-in dataset.

No Kafka and no ledger here: this layer turns accepted requests into an engine round, gates it on
retention, and writes the version to the registry; the commit layer records the outcome. The classes a
model has forgotten (``forget_class`` rounds) are its state: they leave the retention gate's probe
and are kept in the version's manifest (``metrics.forgotten_classes``, where registries have them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from daemon import keys, registry
from daemon.registry import lineage, model_store
from daemon.data.arrays import ArraySource
from daemon.data.folder import ImageFolderSource
from daemon.data.sources import RefError, Source, SourceConfigError, builtin_sources, load_dataset
from daemon.data.splits import DatasetSplits
from daemon.engine.config import UnlearnConfig, preset
from daemon.engine.evaluate import param_drift_l2, predict, prediction_flip_ratio
from daemon.engine.importance import importance_density
from daemon.engine.kinds import get_kind
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import RoundResult
from daemon.pipeline.codec import ModelSpec
from daemon.pipeline.config import ModelSection, RoundsSection, parse_probe, parse_rebase_source
from daemon.pipeline.pending import PendingRequest
from daemon.pipeline.receipts import RoundMetrics
from daemon.pipeline.references import ReferenceModels, ReferencesError, load_references

__all__ = ["Candidate", "ModelRuntime", "RuntimeError_", "open_sources"]

log = structlog.get_logger("unlearnd.runtime")

GATE_REASON = "retention gate"      # how a candidate the retention gate refused says why (receipts, logs)


class RuntimeError_(RuntimeError):  # noqa: N801 - not the builtin
    """A model cannot be loaded or is inconsistent with its configuration."""


@dataclass(frozen=True)
class Candidate:
    """A round's outcome before anything is durable."""

    requests: tuple[PendingRequest, ...]
    result: RoundResult
    importance: dict[str, torch.Tensor] | None
    reason: str | None                          # why it did not pass; None when it passed
    metrics: RoundMetrics | None = None         # None when the engine did not finish the round
    forgotten_classes: frozenset[int] = frozenset()     # the model's, once this candidate is adopted
    probe_pred: torch.Tensor | None = None

    @property
    def passed(self) -> bool:
        return self.reason is None

    @property
    def gate_refused(self) -> bool:
        """The engine finished the round and only the retention gate refused it."""
        return self.reason is not None and self.metrics is not None and self.reason.startswith(GATE_REASON)

    def per_request(self, predictions: torch.Tensor) -> list[list[int]]:
        """A batch-wide prediction tensor (the requests' instances, concatenated in order) cut per request."""
        flat = predictions.tolist()
        out, start = [], 0
        for p in self.requests:
            out.append(flat[start:start + p.size])
            start += p.size
        return out


class ModelRuntime:
    """Everything the daemon keeps about one model; :meth:`open` opens its sources, :meth:`ensure_model` its weights.

    ``splits`` is the first built-in dataset among the sources (what pretraining trains on), or ``None``.
    ``keys``: the daemon's keys (the state key seals the session it publishes, the id key keys content hashes);
    without them (tools, tests) sessions are written in clear and hashes are plain.
    """

    def __init__(self, section: ModelSection, registry_dir: Path, rounds: RoundsSection,
                 sources: Mapping[str, Source], splits: DatasetSplits | None = None, *,
                 instances_of: Callable[[Sequence[str]], int | None] | None = None,
                 keys: keys.DaemonKeys | None = None) -> None:
        self.section = section
        self.name = section.name
        self.registry_dir = registry_dir
        self.rounds = rounds
        self.splits = splits
        self.sources: dict[str, Source] = dict(sources)
        source, start, end = parse_probe(section.probe)
        if source not in self.sources:
            raise RuntimeError_(f"models.{self.name}.probe: unknown source {source!r} "
                                f"(known: {', '.join(self.sources)})")
        size = len(self.sources[source])
        end = size if end is None else end
        if end > size:
            raise RuntimeError_(f"models.{self.name}.probe: {section.probe} runs past the end of {source} "
                                f"({size} items)")
        self._probe_at = (source, range(start, end))
        if section.rebase.enabled():
            name, _first, last = parse_rebase_source(section.rebase.source)
            if name not in self.sources or (last is not None and last > len(self.sources[name])):
                known = (f"{len(self.sources[name])} items" if name in self.sources
                         else f"known: {', '.join(self.sources)}")
                raise RuntimeError_(f"models.{self.name}.rebase.source: {section.rebase.source} is not in the "
                                    f"model's sources ({known})")
        self.probe_y = self.sources[source].labels[start:end].clone()
        self.probe_x = torch.empty(0)            # read by reload(), once the model's input shape is known
        self.live: model_store.LiveModel | None = None
        self.references: ReferenceModels | None = None      # the operator's reference models (reload())
        self.intake_model: nn.Module | None = None
        self.original_probe_pred: torch.Tensor | None = None
        self.current_probe_pred: torch.Tensor | None = None
        self.forgotten_classes: frozenset[int] = frozenset()
        # instances forgotten since the lineage's base (daemon.registry.lineage), read at each load and carried
        # forward by publish(); instances_of tells a pre-count version's request ids in instances (the ledger)
        self.deletions_since_base = 0
        self._instances_of = instances_of
        self.keys = keys

    @classmethod
    def open(cls, section: ModelSection, registry_dir: Path, rounds: RoundsSection, *,
             instances_of: Callable[[Sequence[str]], int | None] | None = None,
             keys: keys.DaemonKeys | None = None) -> ModelRuntime:
        """The runtime of ``section``, its sources opened (its weights are not loaded yet: :meth:`ensure_model`)."""
        sources, splits = open_sources(section)
        return cls(section, registry_dir, rounds, sources, splits, instances_of=instances_of, keys=keys)

    @property
    def state_key(self) -> keys.SecretKey | None:
        """The key that seals the continual state this runtime publishes and opens (None: in clear)."""
        return self.keys.state if self.keys is not None else None

    @property
    def id_key(self) -> keys.SecretKey | None:
        """The key of instance-id and content digests (None: plain SHA-256)."""
        return self.keys.ids if self.keys is not None else None

    def _check_sources(self, shape: tuple[int, int, int]) -> None:
        """Every source can feed the model, and the probe reads (a start-up refusal naming the setting)."""
        for j, entry in enumerate(self.section.source_sections()):
            for name in entry.names():
                why = self.sources[name].accepts(shape)
                if why is not None:
                    raise RuntimeError_(f"models.{self.name}: source {name!r} ({_setting(self.section, j)}) cannot "
                                        f"feed the model: {why}")
        if not self.probe_x.numel():
            source, rows = self._probe_at
            try:
                self.probe_x = self.sources[source].items(list(rows), shape)
            except RefError as exc:
                raise RuntimeError_(f"models.{self.name}.probe: {self.section.probe} cannot be read: {exc}") from None

    # -- loading ------------------------------------------------------------------------------------
    def ensure_model(self) -> None:
        """Load LATEST; with none, train a first version when ``models.pretrain_epochs`` allows, else refuse."""
        if registry.latest_version(self.registry_dir, self.name) is None:
            if self.section.pretrain_epochs <= 0:
                raise RuntimeError_(f"model {self.name!r} has no version in {self.registry_dir} and "
                                    f"models.pretrain_epochs is 0: publish one first (unlearnd pretrain)")
            self._pretrain()
        self.reload()

    def _pretrain(self) -> None:
        from daemon.engine.models import build_model
        from daemon.engine.seeding import seeded_global_rng
        from daemon.engine.session import UnlearningSession
        from daemon.engine.training import TrainConfig, train_classifier

        splits = self.splits
        if splits is None:
            raise RuntimeError_(f"models.{self.name}.pretrain_epochs: pretraining needs a built-in dataset")
        arch = "mnist_cnn" if splits.name == "mnist" else "cifar_resnet18"
        log.info("pretraining", model=self.name, arch=arch, epochs=self.section.pretrain_epochs)
        mean, std = splits.mean_std()
        train = TrainConfig(epochs=self.section.pretrain_epochs)
        with seeded_global_rng(train.seed):     # the initial weights are part of the recipe
            model = build_model(arch, num_classes=splits.num_classes, input_shape=splits.input_shape, mean=mean,
                                std=std)
            model.to(self.rounds.device)
            train_classifier(model, splits.train_x, splits.train_y, train)
        model.cpu().eval()
        session = UnlearningSession(model, num_classes=splits.num_classes)
        model_store.publish(self.registry_dir, self.name, model, session, arch=arch,
                            input_shape=splits.input_shape, classes=splits.classes, parent=None,
                            dataset=splits.name, method={"name": "pretrain", "epochs": self.section.pretrain_epochs},
                            state_key=self.state_key)

    def reload(self) -> None:
        """Load LATEST (after a restart, a rollback, or a version another daemon published)."""
        registry.clean_temporaries(self.registry_dir, self.name)
        try:
            live = model_store.load_live(self.registry_dir, self.name, device=self.rounds.device,
                                         head=self.section.head or None, state_key=self.state_key)
        except model_store.HeadError as exc:
            raise RuntimeError_(f"models.{self.name}.head: {exc}") from None
        except model_store.StateKeyError as exc:
            raise RuntimeError_(f"model {self.name!r}: {exc}") from None
        manifest = live.info.manifest
        if model_store.STATE_SEAL not in manifest and model_store.SESSION_TENSORS in manifest["files"]:
            log.warning("session_in_clear", model=self.name, version=live.version,
                        detail="this version's continual state was written unsealed; the next version is sealed "
                               "(older versions keep theirs until pruned: registry.keep_versions)")
        self._check_sources(live.input_shape)
        if self.section.references and self.references is None:
            try:
                self.references = load_references(self.section.references, live.model,
                                                  self.section.references_source)
            except ReferencesError as exc:
                raise RuntimeError_(f"models.{self.name}.references: {exc}") from None
            log.info("references_loaded", model=self.name, references=len(self.references.models),
                     with_training_indices=sum(t is not None for t in self.references.trained_on))
        self._adopt(live, _forgotten_classes(live.info.manifest))

    def sibling(self, live: model_store.LiveModel, forgotten_classes: frozenset[int]) -> ModelRuntime:
        """A runtime over the same sources and probe whose live state is ``live``: a rebase's weights and fresh
        session, on which the requests applied while it trained are re-applied before anything is published."""
        other = ModelRuntime(self.section, self.registry_dir, self.rounds, self.sources, self.splits, keys=self.keys)
        other.probe_x = self.probe_x
        other.references = self.references
        other._adopt(live, forgotten_classes)
        return other

    def _adopt(self, live: model_store.LiveModel, forgotten_classes: frozenset[int]) -> None:
        """Make ``live`` this runtime's state: the session takes the rounds' settings, the probe is predicted."""
        live.session.accumulation = self.rounds.accumulation
        live.session.memory.energy = self.rounds.memory_energy
        live.session.memory_copies = self.rounds.memory_copies
        self.live = live
        self.forgotten_classes = forgotten_classes
        self.intake_model = copy.deepcopy(live.model).cpu().eval()
        original = copy.deepcopy(live.model)
        with torch.no_grad():
            for n, p in original.named_parameters():
                p.copy_(live.session.original[n].to(p.device))
        self.original_probe_pred = predict(original, self.probe_x).cpu()
        self.current_probe_pred = predict(live.model, self.probe_x).cpu()
        self.deletions_since_base = self._read_deletions(live.info.manifest)

    def _read_deletions(self, manifest: Mapping[str, Any]) -> int:
        """LATEST's deletions since its base: recorded in its manifest, else (a version from before the count)
        walked back once through the lineage, the ledger telling request ids in instances."""
        recorded = lineage.recorded_deletions(manifest)
        if recorded is not None:
            return recorded
        found = lineage.deletions_since_base(self.registry_dir, self.name, self._loaded().version,
                                             instances_of=self._instances_of)
        if not found.exact:
            log.warning("deletions_since_base_lower_bound", model=self.name, deletions=found.deletions,
                        detail="a version on the lineage was pruned or its requests are unknown to this ledger")
        return found.deletions

    def is_current(self) -> bool:
        return self.live is not None and registry.latest_version(self.registry_dir, self.name) == self.live.version

    def _loaded(self) -> model_store.LiveModel:
        if self.live is None:
            raise RuntimeError_(f"model {self.name!r} is not loaded yet (ensure_model)")
        return self.live

    @property
    def spec(self) -> ModelSpec:
        live = self._loaded()
        return ModelSpec(name=self.name, input_shape=live.input_shape, num_classes=live.num_classes,
                         sources=self.sources)

    @property
    def version(self) -> int:
        return self._loaded().version

    def predict_at_intake(self, x: torch.Tensor) -> list[int]:
        """The published model's predictions (never the weights a running round is changing)."""
        if self.intake_model is None:
            raise RuntimeError_(f"model {self.name!r} is not loaded yet (ensure_model)")
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
        if pred is None:
            raise RuntimeError_(f"model {self.name!r} is not loaded yet (ensure_model)")
        return self._accuracy(pred, self.retained_mask())

    def gate_floor(self) -> float:
        """The probe accuracy below which the retention gate refuses a round: the original weights' accuracy on
        the retained classes minus ``rounds.retention_max_drop`` (what :meth:`run_round` compares against)."""
        return self.probe_accuracy("original") - self.rounds.retention_max_drop

    def retention_headroom(self) -> float:
        """How far the live model's probe accuracy is above the gate's floor. Every round costs some accuracy,
        so at 0 or below the next round is refused (and most rounds after it); a small positive value warns
        that rounds will soon be. A ``forget_class`` round is gated with its class left out of the probe, so
        for it the floor moves; this is the headroom of instance rounds."""
        return self.probe_accuracy("current") - self.gate_floor()

    # -- a round ------------------------------------------------------------------------------------
    def goal(self, batch: Sequence[PendingRequest]) -> str | None:
        """The batch's goal: its requests' (one group: one goal), else the model's ``goal``; None for a kind whose
        goal is its own (relabel, forget_class)."""
        kind, _, goal = batch[0].group()
        return (goal or self.section.goal) if get_kind(kind).chooses_goal else None

    def build_request(self, batch: Sequence[PendingRequest]) -> ForgetRequest:
        kind, forget_class, _ = batch[0].group()
        x = torch.stack([inst.x for p in batch for inst in p.decoded.instances]).float()
        labels = torch.tensor([lab for p in batch for lab in p.labels], dtype=torch.int64)
        targets = None
        if get_kind(kind).names_targets:
            targets = torch.tensor([t for p in batch for t in (p.targets or [])], dtype=torch.int64)
        return ForgetRequest(kind=kind, x=x, labels=labels, targets=targets, forget_class=forget_class)

    def round_config(self, kind: str, goal: str | None = None) -> UnlearnConfig:
        """The engine settings of this model's rounds of ``kind``: the preset's, then ``rounds.held_impressions``,
        then the model's own ``settings``; goal ``unseen`` stops on the membership check (``stop`` "unseen")."""
        config = preset(self.rounds.preset, self.rounds.method, kind)
        if self.rounds.held_impressions:
            config = config.with_overrides(held_impressions=self.rounds.held_impressions)
        if self.section.settings:
            config = config.with_overrides(**self.section.round_settings())
        if goal == "unseen":
            config = config.with_overrides(stop="unseen")
        return config

    def heldout(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The membership check's held-out reference: the probe items of the classes the model still recognises
        (data the model never trained on, by the operator's choice of probe)."""
        mask = self.retained_mask()
        return (self.probe_x[mask], self.probe_y[mask]) if bool(mask.any()) else None

    def reference_scores(self, batch: Sequence[PendingRequest], request: ForgetRequest) -> torch.Tensor | None:
        """The instances' scores under the operator's reference models (None: none configured, or a kind whose
        goal is its own): the membership check then judges each instance by them, not by the probe."""
        if self.references is None or not get_kind(request.kind).chooses_goal:
            return None
        refs = [inst.ref for p in batch for inst in p.decoded.instances]
        return self.references.scores(request.x, request.labels, refs, self.sources)

    def run_round(self, batch: Sequence[PendingRequest], should_abort: Callable[[], bool]) -> Candidate:
        """Run the engine on a copy of the live state (nothing is adopted) and gate the result on retention."""
        live = self._loaded()
        request = self.build_request(batch)
        heldout = self.heldout()
        config = self.round_config(request.kind, self.goal(batch) if heldout is not None else None)
        result, importance = live.session.run_round(request, method=self.rounds.method, config=config,
                                                    sentinel=self.probe_x, should_abort=should_abort, commit=False,
                                                    heldout=heldout, reference_scores=self.reference_scores(batch,
                                                                                                            request))
        requests = tuple(batch)
        if not result.succeeded:
            reason = f"{result.outcome}" + (f": {result.reason}" if result.reason else "")
            return Candidate(requests, result, importance, reason)
        candidate_model = copy.deepcopy(live.model)
        candidate_model.load_state_dict(result.state)
        probe_pred = predict(candidate_model, self.probe_x).cpu()
        mask = self.retained_mask(request.forget_class)
        acc = self._accuracy(probe_pred, mask)
        original_acc = self._accuracy(self.original_probe_pred, mask)
        metrics = RoundMetrics(
            forget_accuracy=result.acc_forget,
            probe_accuracy_before=self._accuracy(self.current_probe_pred, mask),
            probe_accuracy_after=acc,
            probe_accuracy_original=original_acc,
            param_drift_l2_original=param_drift_l2(_params(candidate_model), live.session.original),
            param_drift_l2_previous=param_drift_l2(_params(candidate_model), _params(live.model)),
            prediction_flip_ratio_original=prediction_flip_ratio(self.original_probe_pred, probe_pred),
            prediction_flip_ratio_previous=prediction_flip_ratio(self.current_probe_pred, probe_pred),
            importance_density_ratio=importance_density(importance) if importance else 0.0,
        )
        floor = original_acc - self.rounds.retention_max_drop
        if not acc >= floor:
            return Candidate(requests, result, importance,
                             f"{GATE_REASON}: probe accuracy {acc:.4f} is below {floor:.4f} (original "
                             f"{original_acc:.4f} - {self.rounds.retention_max_drop})", metrics)
        forgotten = self.forgotten_classes
        if request.forget_class is not None:
            forgotten = forgotten | {request.forget_class}
        return Candidate(requests, result, importance, None, metrics, forgotten, probe_pred)

    def adopt_candidate(self, candidate: Candidate) -> None:
        """Take a passed candidate into the live state without publishing it (a rebase's re-applied rounds)."""
        live = self._loaded()
        live.session.commit(candidate.result, candidate.importance)
        self.forgotten_classes = candidate.forgotten_classes
        self.current_probe_pred = candidate.probe_pred

    def publish(self, candidate: Candidate, round_id: str, method: Mapping[str, Any], *,
                owner_epoch: int | None = None, set_latest: bool = True) -> registry.VersionInfo:
        """Adopt the candidate and write it as the next version (atomic; LATEST moves last, here unless
        ``set_latest`` is False: then the caller moves it once it has checked its ownership, issue 24)."""
        live = self._loaded()
        if not candidate.passed or candidate.metrics is None:
            raise ValueError(f"only a candidate that passed is published; this one: {candidate.reason}")
        previous = live.session.snapshot()
        live.session.commit(candidate.result, candidate.importance)
        try:
            info = model_store.publish(
                self.registry_dir, self.name, copy.deepcopy(live.model).cpu(), live.session, arch=live.arch,
                head=live.head, input_shape=live.input_shape, classes=live.classes, parent=live.version,
                dataset=self.splits.name if self.splits else None, round_id=round_id,
                request_ids=[p.request_id for p in candidate.requests], method=dict(method),
                metrics=candidate.metrics.manifest_dict(candidate.forgotten_classes),
                instances=sum(p.size for p in candidate.requests), parent_deletions=self.deletions_since_base,
                state_key=self.state_key, owner_epoch=owner_epoch, set_latest=set_latest)
        except BaseException:
            live.session.undo(previous)          # the live model and session stay what LATEST says
            raise
        live.info = info
        self.deletions_since_base = int(info.manifest[lineage.DELETIONS_KEY])
        self.forgotten_classes = candidate.forgotten_classes
        self.intake_model = copy.deepcopy(live.model).cpu().eval()
        self.current_probe_pred = candidate.probe_pred
        return info


def open_sources(section: ModelSection) -> tuple[dict[str, Source], DatasetSplits | None]:
    """The model's sources by name, and its first built-in dataset (for pretraining), or a refusal naming the setting.

    Lazy: a folder is listed (no file opened), an array file mapped (its labels read); built-ins load as today.
    """
    sources: dict[str, Source] = {}
    first: DatasetSplits | None = None
    for j, entry in enumerate(section.source_sections()):
        try:
            if entry.kind == "builtin":
                splits = load_dataset(entry.dataset, Path(entry.data_root) if entry.data_root else None)
                first = first or splits
                sources.update(builtin_sources(splits))
            elif entry.kind == "folder":
                sources[entry.name] = ImageFolderSource.open(entry.path, resize=entry.resize)
            else:
                sources[entry.name] = ArraySource.open(entry.path)
        except (SourceConfigError, ValueError, OSError) as exc:
            raise RuntimeError_(f"models.{section.name}: {_setting(section, j)}: {exc}") from None
    return sources, first


def _setting(section: ModelSection, j: int) -> str:
    """The setting behind ``section.source_sections()[j]`` (``sources[1].path``, ``dataset``)."""
    if section.dataset:
        if j == 0:
            return "dataset"
        j -= 1
    entry = section.sources[j]
    return f"sources[{j}]" + (".path" if entry.kind != "builtin" else ".dataset")


def _forgotten_classes(manifest: Mapping[str, Any]) -> frozenset[int]:
    """The classes a version has forgotten, as its manifest records them (see :meth:`RoundMetrics.manifest_dict`)."""
    return frozenset((manifest.get("metrics") or {}).get("forgotten_classes", []))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters()}
