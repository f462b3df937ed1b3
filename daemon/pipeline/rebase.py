"""Exact rebases: retrain a model from scratch on its training source minus everything forgotten, then publish it.

Continual unlearning drifts; a model retrained without the forgotten instances is the exact answer when the
training data exists. A rebase runs in two phases so that rounds (and receipts) never wait for its training:

1. **train** (:meth:`Rebaser.prepare`, on its own thread at the rounds' CPU policy): snapshot the ledger's
   forgotten set (the newest ``forgotten_content`` seq), build the training set by content hash
   (:mod:`daemon.pipeline.rebase_set`), record the job as ``running`` with the snapshot (count and digest),
   and train the model's factory from fresh weights with unlearnd's recipe (``TrainConfig``, seed 0,
   ``rebase.epochs``). Rounds keep being applied on the serving lineage meanwhile. Then **catch up**, still
   beside the rounds: re-apply, in commit order and one round per original round, every request forgotten after
   the snapshot, on the rebased weights with a fresh session (instances are read back from the source by content
   hash; an instance that is not a training item needs nothing: the rebased model never saw it); again for what
   was committed during that pass, up to ``CATCH_UP_PASSES`` passes.
2. **finish** (:meth:`Rebaser.finish`, on the round thread, so no round runs beside it): re-apply the rest (what
   the last pass let through), gate the result with the rounds' retention rule against the serving lineage's
   original, and publish it as a new version with the commit discipline of a round (the ledger's ``committing``
   row before the registry write, then ``committed`` with its receipts).

Because the finish runs on the round thread, nothing is applied while it runs: requests that arrive then wait
in the batcher and are applied after it, on the rebased lineage, in order. The catch-up passes keep that wait
short (about the rounds applied during the last pass) however long the training took.

``exact`` receipts go to the requests whose instances the rebase left out: those forgotten at or before the
snapshot (once per request, by the first rebase that covers it). Requests re-applied on top of the rebase are
*not* exact yet (the rebase trained on them before they were unlearned again): the next rebase covers them.

A crash anywhere leaves the old version serving: ``LATEST`` moves only in the registry write, after the ledger
recorded the intent. At start-up (:meth:`Rebaser.recover`) a ``committing`` job whose version reached the
registry is rolled forward; any other unfinished job waits to run again from scratch.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from torch import nn

from daemon import registry
from daemon.data.sources import Source
from daemon.engine.models import build_classifier
from daemon.engine.seeding import seeded_global_rng
from daemon.engine.session import UnlearningSession
from daemon.engine.training import TrainConfig, train_classifier
from daemon.pipeline.bucket import RegistryUnavailable, mirror_publish
from daemon.pipeline.canonical import canonical_json
from daemon.pipeline.codec import DecodedInstance, DecodedRequest
from daemon.pipeline.commit import MODEL_EVENT_SCHEMA, find_version
from daemon.pipeline.config import parse_rebase_source
from daemon.pipeline.failpoints import failpoint
from daemon.pipeline.ledger import ForgottenContent, Ledger
from daemon.pipeline.pending import PendingRequest
from daemon.pipeline.rebase_set import ForeignKeyError, TrainingSet, build_training_set
from daemon.pipeline.receipts import ExactReceipt, ReceiptChain
from daemon.pipeline.runtime import ModelRuntime
from daemon.registry import model_store
from daemon.registry.mirror import RegistryMirror

__all__ = ["REBASE_EVENT_SCHEMA", "RebaseAborted", "RebaseCommitInterrupted", "RebaseOutcome", "RebaseRefused",
           "Rebaser", "TrainedRebase"]

log = structlog.get_logger("unlearnd.rebase")

REBASE_EVENT_SCHEMA = "unlearn.rebase/v1"
CATCH_UP_PASSES = 3     # re-application passes beside the rounds before the rest is done on the round thread


class RebaseAborted(Exception):
    """The daemon is stopping: the job is left to run again from scratch."""


class RebaseCommitInterrupted(Exception):
    """The publish failed after the rebase's intent was recorded, for a reason other than a stop (the ledger gone, a
    store refusing the version): its version may already be the local ``LATEST``, so marking it ``failed`` would
    leave a version no receipt names serving. Only start-up recovery resolves it, as after a kill -9 there: the
    daemon stops (exit 75) and the next start rolls it forward or restarts it."""

    def __init__(self, rebase_id: str, cause: BaseException) -> None:
        super().__init__(f"rebase {rebase_id}: {type(cause).__name__}: {cause}")
        self.rebase_id = rebase_id


class RebaseRefused(Exception):
    """The rebase cannot be exact (a forgotten instance without a content hash, a source too short)."""


@dataclass
class TrainedRebase:
    """A rebase between its phases: the freshly trained weights, what they were trained on, and how far the
    re-application has come (``sibling``: the rebased runtime once a round was re-applied on it; ``applied_seq``:
    the ledger's forgotten rows up to here are in it). Owned by one thread at a time: the rebase's, then the
    round thread."""

    rebase_id: str
    model: str
    base_version: int
    snapshot_seq: int
    training: TrainingSet
    weights: nn.Module
    forgotten_classes: frozenset[int]
    seconds: float
    applied_seq: int = 0
    sibling: ModelRuntime | None = None
    reapplied: list[str] = field(default_factory=list)
    unseen: list[str] = field(default_factory=list)     # forgotten since the snapshot, none a training item


@dataclass(frozen=True)
class RebaseOutcome:
    """What became of a rebase: ``committed``, ``failed`` or ``aborted`` (to run again)."""

    status: str
    rebase_id: str
    model: str
    version: registry.VersionInfo | None = None
    reason: str | None = None
    reapplied: tuple[str, ...] = ()
    exact: int = 0


class Rebaser:
    """Runs rebases for the models of one daemon (``owner``) and records them in its ledger."""

    def __init__(self, ledger: Ledger, registry_dir: Path, receipts: ReceiptChain, *, models_topic: str,
                 owner: str) -> None:
        self.ledger = ledger
        self.registry_dir = registry_dir
        self.receipts = receipts
        self.models_topic = models_topic
        self.owner = owner
        self.mirror: RegistryMirror | None = None   # the bucket versions are pushed to (registry.url), if any

    # -- when -----------------------------------------------------------------------------------------
    def due(self, rt: ModelRuntime) -> str | None:
        """The policy that asks for a rebase of ``rt`` now, or None. Every policy needs something forgotten since
        the last rebase ended, so a rebase that failed is not retried in a loop."""
        r = rt.section.rebase
        if not r.enabled() or not (r.every_deletions or r.probe_margin or r.memory_fill):
            return None
        new = self.ledger.forgotten_since_last_rebase(rt.name)
        if not new:
            return None
        if r.every_deletions and new >= r.every_deletions:
            return "every_deletions"
        if r.probe_margin and rt.live is not None:
            floor = rt.probe_accuracy("original") - rt.rounds.retention_max_drop
            if rt.probe_accuracy("current") <= floor + r.probe_margin:
                return "probe_margin"
        if r.memory_fill and rt.live is not None:
            fill = rt.live.session.memory.fill()
            # the roomiest layer (1 - unlearnd_memory_free_ratio): narrow layers (mnist_cnn's convolutions)
            # are full after one round and say nothing on their own
            if fill and min(fill.values()) >= r.memory_fill:
                return "memory_fill"
        return None

    def requested(self, models: Sequence[str]) -> tuple[str, str] | None:
        """The oldest rebase waiting to run for one of ``models``: (rebase id, model)."""
        for r in self.ledger.rebases(states=("requested",)):
            if r["model"] in models:
                return r["rebase_id"], r["model"]
        return None

    # -- phase 1: train (its own thread) ---------------------------------------------------------------
    def train(self, rt: ModelRuntime, rebase_id: str, abort: threading.Event) -> TrainedRebase:
        """Snapshot the forgotten set, record the job as running, build the training set and train."""
        start = time.monotonic()
        section = rt.section.rebase
        live = rt.live
        if live is None:
            raise RebaseRefused(f"model {rt.name!r} is not loaded")
        missing = self.ledger.forgotten_without_content(rt.name)
        if missing:
            raise RebaseRefused(f"{missing} forgotten instance(s) of {rt.name!r} were committed before the ledger "
                                "kept content hashes (schema 1): a rebase cannot find them in the source")
        name, first, end = parse_rebase_source(section.source)
        source = rt.sources[name]
        end = len(source) if end is None else end
        if end > len(source):
            raise RebaseRefused(f"models.{rt.name}.rebase.source: {section.source} runs past the end of {name} "
                                f"({len(source)} items)")
        snapshot_seq = self.ledger.content_seq(rt.name)
        rows = self.ledger.forgotten_content(rt.name, upto_seq=snapshot_seq)
        base_version, manifest = live.version, live.info.manifest
        classes = set(rt.forgotten_classes) | {r.forget_class for r in rows
                                               if r.kind == "forget_class" and r.forget_class is not None}
        try:
            training = build_training_set(source, section.source, range(first, end), live.input_shape, rows, classes,
                                          key=rt.id_key)
        except ForeignKeyError as exc:
            raise RebaseRefused(str(exc)) from None
        lost = sorted({r.request_id for r in rows if r.kind == "relabel" and training.status_of(r) == "not_in_source"})
        if lost:
            raise RebaseRefused(f"relabel request(s) {', '.join(lost[:5])} name instances that are not items of the "
                                f"training source {section.source}: a rebase would lose their targets")
        self.ledger.start_rebase(rebase_id, self.owner, base_version=base_version, snapshot_seq=snapshot_seq,
                                 forgotten=training.forgotten, excluded=training.excluded, digest=training.digest)
        log.info("rebase_training", rebase_id=rebase_id, model=rt.name, base_version=base_version,
                 source=section.source, items=len(training.indices), excluded=training.excluded,
                 forgotten=training.forgotten, epochs=section.epochs)
        if not training.indices:
            raise RebaseRefused(f"models.{rt.name}.rebase.source: nothing is left of {section.source} to train on")
        recipe = TrainConfig(epochs=section.epochs)

        def progress(_step: int, _total: int, _info: Mapping[str, float]) -> None:
            if abort.is_set():
                raise RebaseAborted("the daemon is stopping")

        x = source.items(training.indices, live.input_shape)
        with seeded_global_rng(recipe.seed):        # the initial weights are part of the recipe (as pretrain)
            weights = build_classifier(live.factory, mean=manifest.get("mean") or [0.0] * live.input_shape[0],
                                       std=manifest.get("std") or [1.0] * live.input_shape[0])
            weights.to(rt.rounds.device)
            train_classifier(weights, x, training.labels, recipe, progress=progress)
        del x
        failpoint("rebase_before_training_end")
        return TrainedRebase(rebase_id, rt.name, base_version, snapshot_seq, training, weights.cpu().eval(),
                             frozenset(classes), time.monotonic() - start, applied_seq=snapshot_seq)

    def prepare(self, rt: ModelRuntime, rebase_id: str, abort: threading.Event) -> TrainedRebase:
        """Phase 1 whole, on the rebase's thread: train, then catch up with the rounds applied meanwhile."""
        return self.catch_up(rt, self.train(rt, rebase_id, abort), abort.is_set)

    def catch_up(self, rt: ModelRuntime, trained: TrainedRebase, should_abort: Callable[[], bool]) -> TrainedRebase:
        """Re-apply, still beside the rounds, what they committed since the snapshot; again for what they committed
        during that pass, up to ``CATCH_UP_PASSES`` times. What is left then (what the last pass's time let through:
        about a round or two) is re-applied by :meth:`finish` on the round thread, where nothing else is applied,
        so the rounds wait only for that remainder, not for every round applied while the rebase trained."""
        for _ in range(CATCH_UP_PASSES):
            upto = self.ledger.content_seq(rt.name)
            if upto == trained.applied_seq:
                break
            self._reapply(rt, trained, upto, should_abort)
        return trained

    def _reapply(self, rt: ModelRuntime, trained: TrainedRebase, upto: int, should_abort: Callable[[], bool]) -> None:
        """Re-apply the forgotten rows ``applied_seq < seq <= upto`` on the rebased weights, one round per original
        round, in commit order; raises :class:`RebaseAborted` (stopping) or :class:`RebaseRefused` (a round failed)."""
        base = rt.live
        assert base is not None
        if trained.sibling is None:
            engine_head = None
            if base.head is not None:
                engine_head = model_store.check_head(trained.weights, base.num_classes, base.head,
                                                     f"{rt.name} rebase")
            session = UnlearningSession(trained.weights, num_classes=base.num_classes, head=engine_head)
            fresh = model_store.LiveModel(name=rt.name, arch=base.arch, model=trained.weights, session=session,
                                          info=base.info, factory=base.factory, head=base.head)
            trained.sibling = rt.sibling(fresh, trained.forgotten_classes)
        sibling = trained.sibling
        source = rt.sources[parse_rebase_source(trained.training.source)[0]]
        later = self.ledger.forgotten_content(rt.name, after_seq=trained.applied_seq, upto_seq=upto)
        for round_id, group in itertools.groupby(later, key=lambda r: r.round_id):
            rows = list(group)
            batch = _reapplication(rt.name, rows, trained.training, source, base.input_shape)
            batched = {p.request_id for p in batch}
            # none of their instances is a training item: the rebased model never saw them, nothing to re-apply
            trained.unseen.extend(dict.fromkeys(r.request_id for r in rows if r.request_id not in batched))
            if not batch:
                continue
            candidate = sibling.run_round(batch, should_abort=should_abort)
            if candidate.result.outcome == "aborted":
                raise RebaseAborted("stopped while re-applying")
            if not candidate.passed:
                raise RebaseRefused(f"re-applying round {round_id} on the rebased weights: {candidate.reason}")
            sibling.adopt_candidate(candidate)
            trained.reapplied.extend(p.request_id for p in batch)
            log.info("rebase_reapplied", rebase_id=trained.rebase_id, model=rt.name, round_id=round_id,
                     requests=len(batch))
        trained.applied_seq = upto

    # -- phase 2: finish (the round thread) ------------------------------------------------------------
    def finish(self, rt: ModelRuntime, trained: TrainedRebase, should_abort: Callable[[], bool]) -> RebaseOutcome:
        """Re-apply the rest of what was forgotten since the snapshot, gate, and publish durably; or fail, keeping
        the old lineage."""
        bound = log.bind(rebase_id=trained.rebase_id, model=rt.name)
        if not rt.is_current():
            rt.reload()
        base = rt.live
        assert base is not None
        covered_seq = self.ledger.content_seq(rt.name)
        try:
            self._reapply(rt, trained, covered_seq, should_abort)
        except RebaseAborted as exc:
            return self.aborted(trained.rebase_id, rt.name, str(exc))
        except RebaseRefused as exc:
            return self.fail(trained.rebase_id, rt.name, str(exc))
        sibling, reapplied = trained.sibling, list(trained.reapplied)
        assert sibling is not None and sibling.live is not None
        mask = sibling.retained_mask()
        accuracy = sibling._accuracy(sibling.current_probe_pred, mask)
        original = rt._accuracy(rt.original_probe_pred, mask)
        floor = original - rt.rounds.retention_max_drop
        if not accuracy >= floor:
            return self.fail(trained.rebase_id, rt.name, f"retention gate: probe accuracy {accuracy:.4f} is below "
                                                f"{floor:.4f} (original {original:.4f} - "
                                                f"{rt.rounds.retention_max_drop})")
        summary = {"source": trained.training.source, "excluded": trained.training.excluded,
                   "relabeled": trained.training.relabeled, "forgotten": trained.training.forgotten,
                   "digest": trained.training.digest}
        drafts = self._exact_drafts(trained, rt.name, base.version, summary)
        event = {"schema": REBASE_EVENT_SCHEMA, "request_id": None, "status": "rebased", "model": rt.name,
                 "rebase_id": trained.rebase_id, "previous_version": base.version, "rebase": summary,
                 "reapplied": reapplied, "unseen": list(trained.unseen), "probe_accuracy": accuracy,
                 "probe_accuracy_original": original,
                 "daemon": self.receipts.daemon}
        try:
            info = self._publish(rt, trained, sibling, base, covered_seq, drafts, event, summary, accuracy, original,
                                 reapplied, should_abort)
        except RegistryUnavailable as exc:
            # stopped while the store was unreachable: the version is written here and the job is committing, so
            # the next start's recovery pushes and commits it (as a round's); failing the job instead would leave
            # a version no receipt or audit event names, which that start would push to the bucket as LATEST
            bound.warning("rebase_push_interrupted", error=str(exc))
            return RebaseOutcome("aborted", trained.rebase_id, rt.name, None, reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever it was, only the recovery can resolve it
            raise RebaseCommitInterrupted(trained.rebase_id, exc) from exc
        rt.reload()
        bound.info("rebase_committed", version=info.version, reapplied=len(reapplied), exact=len(drafts),
                   excluded=trained.training.excluded, probe_accuracy=accuracy, train_s=round(trained.seconds, 1))
        return RebaseOutcome("committed", trained.rebase_id, rt.name, info, reapplied=tuple(reapplied),
                             exact=len(drafts))

    def _publish(self, rt: ModelRuntime, trained: TrainedRebase, sibling: ModelRuntime, base: Any, covered_seq: int,
                 drafts: list[ExactReceipt], event: dict[str, Any], summary: Mapping[str, Any], accuracy: float,
                 original: float, reapplied: list[str], should_abort: Callable[[], bool]) -> Any:
        """Record the intent, write the version, push it, commit: the durable steps of a rebase, in the order of a
        round's (the README's commit order)."""
        self.ledger.begin_rebase_commit(trained.rebase_id, base.version, covered_seq,
                                        {"exact": [d.to_dict() for d in drafts], "event": event})
        failpoint("rebase_before_publish")
        method = {"name": "rebase", "rebase_id": trained.rebase_id, "base_version": base.version,
                  "epochs": rt.section.rebase.epochs, **summary, "snapshot_seq": trained.snapshot_seq,
                  "reapplied": reapplied, "unseen": list(trained.unseen), "train_seconds": round(trained.seconds, 1)}
        metrics: dict[str, Any] = {"probe_accuracy_after": accuracy, "probe_accuracy_original": original}
        if sibling.forgotten_classes:
            metrics["forgotten_classes"] = sorted(sibling.forgotten_classes)
        info = model_store.publish(self.registry_dir, rt.name, sibling.live.model.cpu(), sibling.live.session,
                                   arch=base.arch, head=base.head, input_shape=base.input_shape,
                                   classes=base.classes, parent=base.version,
                                   dataset=rt.splits.name if rt.splits else None, round_id=trained.rebase_id,
                                   method=method, metrics=metrics, state_key=rt.state_key)
        failpoint("rebase_after_publish")
        mirror_publish(self.mirror, rt.name, info.version, should_abort=should_abort)   # waits out the store
        self._commit(trained.rebase_id, rt.name, info, drafts, event)
        return info

    def _exact_drafts(self, trained: TrainedRebase, model: str, base_version: int, summary: Mapping[str, Any]
                      ) -> list[ExactReceipt]:
        """An ``exact`` draft per request of the snapshot not yet exact, every instance saying what was done."""
        rows = self.ledger.forgotten_content(model, upto_seq=trained.snapshot_seq)
        done = self.ledger.exact_requests(r.request_id for r in rows)
        per_request: dict[str, list[ForgottenContent]] = {}
        for r in rows:
            if r.request_id not in done:
                per_request.setdefault(r.request_id, []).append(r)
        return [ExactReceipt(request_id=rid, model=model, kind=rs[0].kind, rebase_id=trained.rebase_id,
                             previous_version=base_version, rebase=dict(summary),
                             instances=tuple((r.id_sha256, trained.training.status_of(r)) for r in rs))
                for rid, rs in per_request.items()]

    def _commit(self, rebase_id: str, model: str, info: registry.VersionInfo, drafts: Sequence[ExactReceipt],
                event: Mapping[str, Any]) -> None:
        """The rebase, its exact receipts, its audit event and the model event, in one transaction."""
        now = time.time()
        with self.ledger.transaction() as tx:
            tx.end_rebase(rebase_id, "committed", version=info.version)
            for d in drafts:
                tx.mark_exact(d.request_id, rebase_id, info.version)
                self.receipts.append(tx, d.completed(version=info.version, sha256=info.sha256, exact_at=now))
            tx.append_audit({**event, "model_version": info.version, "model_sha256": info.sha256})
            tx.enqueue(self.models_topic, model.encode(), canonical_json({
                "schema": MODEL_EVENT_SCHEMA, "model": model, "version": info.version, "sha256": info.sha256,
                "path": str(info.path), "round_id": rebase_id}))

    def fail(self, rebase_id: str, model: str, reason: str) -> RebaseOutcome:
        """The rebase ends ``failed`` (in the ledger and the audit trail); the old lineage keeps serving."""
        with self.ledger.transaction() as tx:
            tx.end_rebase(rebase_id, "failed", reason=reason)
            tx.append_audit({"schema": REBASE_EVENT_SCHEMA, "request_id": None, "status": "rebase_failed",
                             "model": model, "rebase_id": rebase_id, "reason": reason,
                             "daemon": self.receipts.daemon})
        log.warning("rebase_failed", rebase_id=rebase_id, model=model, reason=reason)
        return RebaseOutcome("failed", rebase_id, model, reason=reason)

    def aborted(self, rebase_id: str, model: str, reason: str) -> RebaseOutcome:
        """The daemon is stopping: the job waits in the ledger to run again from scratch."""
        self.ledger.restart_rebase(rebase_id, reason)
        log.warning("rebase_aborted", rebase_id=rebase_id, model=model, reason=reason)
        return RebaseOutcome("aborted", rebase_id, model, reason=reason)

    # -- start-up -------------------------------------------------------------------------------------
    def recover(self, runtimes: Mapping[str, ModelRuntime]) -> None:
        """Roll a rebase whose version reached the registry forward; restart every other unfinished one."""
        for r in self.ledger.rebases(states=("running", "committing")):
            if r["owner"] not in (None, self.owner):
                continue
            rt = runtimes.get(r["model"])
            found = find_version(self.registry_dir, r["model"], r["rebase_id"]) if r["state"] == "committing" \
                else None
            if found is None:
                self.ledger.restart_rebase(r["rebase_id"], "the daemon stopped before the rebase was durable: "
                                                           "it runs again from scratch")
                log.warning("rebase_restarted", rebase_id=r["rebase_id"], model=r["model"], state=r["state"])
                continue
            log.warning("rebase_rolled_forward", rebase_id=r["rebase_id"], version=found.version)
            if (registry.latest_version(self.registry_dir, r["model"]) or 0) < found.version:
                registry.set_latest(self.registry_dir, r["model"], found.version)
            mirror_publish(self.mirror, r["model"], found.version)
            drafts = r["drafts"]
            self._commit(r["rebase_id"], r["model"], found,
                         [ExactReceipt.from_draft(d) for d in drafts.get("exact", [])], drafts.get("event", {}))
            if rt is not None:
                rt.reload()


def _reapplication(model: str, rows: Sequence[ForgottenContent], training: TrainingSet, source: Source,
                   shape: tuple[int, int, int]) -> list[PendingRequest]:
    """One committed round's requests rebuilt from the training source (their instances that are items of it, read
    back by content hash), in the round's order, with the labels and targets the round used.

    A ``forget`` instance that is not a training item needs nothing (the rebased model never saw it). A
    ``forget_class`` request whose examples are none of them is re-applied on training items of its class (the
    examples only show the class; the class is what must go). A ``relabel`` instance that is not a training item
    cannot be re-applied (its pixels were never kept), so the rebase is refused rather than lose its target.
    """
    requests: list[PendingRequest] = []
    for request_id, group in itertools.groupby(rows, key=lambda r: r.request_id):
        group = list(group)
        first = group[0]
        found = [r for r in group if r.content_sha256 in training.by_hash]
        indices = [training.by_hash[r.content_sha256] for r in found]
        if first.kind == "relabel" and len(found) < len(group):
            raise RebaseRefused(f"relabel request {request_id} names {len(group) - len(found)} instance(s) that are "
                                f"not items of the training source {training.source}: a rebase would lose their "
                                f"targets")
        if first.kind == "forget_class" and not found and first.forget_class is not None:
            of_class = [i for i in sorted(training.by_hash.values())
                        if int(source.labels[i]) == first.forget_class][:len(group)]
            found = [r for r, _ in zip(group, of_class, strict=False)]
            indices = of_class
        if not found:
            continue
        x = source.items(indices, shape)
        decoded = DecodedRequest(
            request_id=request_id, model=model, kind=first.kind, forget_class=first.forget_class, submitted_at=None,
            instances=[DecodedInstance(id_sha256=r.id_sha256, x=x[i], label=r.label, target=r.target, ref=None)
                       for i, r in enumerate(found)])
        targets = [int(r.target) for r in found] if first.kind == "relabel" else None
        requests.append(PendingRequest(decoded=decoded, topic="", partition=-1, offset=-1, received_at=0.0,
                                       labels=[int(r.label) for r in found], targets=targets))
    return requests
