"""A round from computation to durable outcome, and the recovery of rounds left unfinished.

A round commits in this order, each step durable before the next:

1. ledger: the round is ``committing``, with its draft receipts (hashes only);
2. registry: the new version (atomic directory rename, then ``LATEST``);
2b. bucket (``registry.url = "s3://…"``): the version is pushed, files, manifest, then the bucket's ``LATEST``
    (:func:`mirror_publish`); a crash before it ends is completed by the recovery, which pushes again;
3. ledger: the round is ``committed``; receipts enter the audit chain and the outbox in one transaction;
4. broker: receipts and the ``unlearn.models`` event leave the outbox; servers are notified;
5. Kafka: the offsets move past the round's messages.

A crash before 2 abandons the round (Kafka redelivers its messages); a crash after 2 is rolled
forward at start-up from the drafts. Nothing is applied twice, because the ledger remembers every
(topic, partition, offset) and every request id.

Steps 1-3 are here (:meth:`RoundCommitter.run`, on the round thread); the outbox does 4 and the daemon 5.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from daemon import registry
from daemon.data.content import content_sha256_rows
from daemon.engine.rounds import RoundResult
from daemon.pipeline.canonical import canonical_json
from daemon.pipeline.failpoints import failpoint
from daemon.pipeline.ledger import ForgottenContent, Ledger
from daemon.pipeline.ownership import StaleOwner, check_publish
from daemon.pipeline.pending import PendingRequest
from daemon.pipeline.receipts import (
    AppliedReceipt,
    FailedReceipt,
    ReceiptChain,
    RoundMetrics,
    instance_outcomes,
)
from daemon.pipeline.runtime import Candidate, ModelRuntime
from daemon.pipeline.bucket import mirror_publish, s3_failpoint
from daemon.registry.mirror import RegistryMirror

__all__ = ["MODEL_EVENT_SCHEMA", "RoundCommitter", "RoundOutcome", "StartupError", "find_version"]

log = structlog.get_logger("unlearnd.daemon")

# The ledger's own round ids (Ledger.allocate_round: "r-000042") and rebase ids (Ledger.request_rebase:
# "rb-000001"); others were written outside a daemon.
_DAEMON_ROUND = re.compile(r"rb?-\d{6,9}")

MODEL_EVENT_SCHEMA = "unlearn.model/v1"


class StartupError(RuntimeError):
    """The daemon refuses to start: configuration or state is inconsistent (message says how)."""


@dataclass(frozen=True)
class RoundOutcome:
    """What became of a round: ``applied``, ``failed``, ``split`` (retried in halves), ``deferred`` (refused by the
    retention gate while a rebase of the model runs: its requests wait for the rebase) or ``aborted``."""

    status: str
    result: RoundResult
    metrics: RoundMetrics | None = None
    version: registry.VersionInfo | None = None


class RoundCommitter:
    """Runs a round on a model and records its outcome durably, in the order the module docstring gives."""

    def __init__(self, ledger: Ledger, registry_dir: Path, receipts: ReceiptChain, *, models_topic: str,
                 method: Mapping[str, Any], split_failed: bool, keep_versions: int,
                 rebasing: Callable[[str], bool] | None = None, mirror: RegistryMirror | None = None) -> None:
        self.ledger = ledger
        self.mirror = mirror                # the bucket the registry is published to (None: the folder alone)
        self.registry_dir = registry_dir
        self.receipts = receipts
        self.models_topic = models_topic
        self.method = dict(method)          # name, preset, accumulation, memory: the round adds its params
        self.split_failed = split_failed
        self.keep_versions = keep_versions
        # whether a rebase of the model is running: a round the retention gate refuses then waits for it (the
        # rebase resets the headroom), instead of failing requests the rebased model would accept
        self.rebasing = rebasing

    # -- a round ------------------------------------------------------------------------------------
    def run(self, rt: ModelRuntime, batch: Sequence[PendingRequest], round_id: str,
            should_abort: Callable[[], bool], epoch: int | None = None) -> RoundOutcome:
        """On the round thread: compute, gate, and commit durably (steps 1-3).

        ``epoch``: the ownership epoch the daemon held for the model when the round started (issue 24; None: it
        never took the model). Steps 1 and 3 are fenced with it and ``LATEST`` moves only after
        :func:`~daemon.pipeline.ownership.check_publish`; a refusal is the outcome ``stale``."""
        bound = log.bind(round_id=round_id, model=rt.name)
        candidate = rt.run_round(batch, should_abort=should_abort)
        result = candidate.result
        if result.outcome == "aborted":
            with self.ledger.transaction() as tx:
                tx.end_round(round_id, "aborted", reason="stopped within the grace period")
            bound.warning("round_aborted")
            return RoundOutcome("aborted", result)
        method = {**self.method, "params": result.config.to_dict()}
        if (not candidate.passed and candidate.gate_refused and self.rebasing is not None
                and self.rebasing(rt.name)):
            with self.ledger.transaction() as tx:
                tx.end_round(round_id, "deferred", reason=f"{candidate.reason}; a rebase of the model is running: "
                                                          "its requests wait for it")
            bound.warning("round_deferred", reason=candidate.reason, requests=len(batch))
            return RoundOutcome("deferred", result)
        if not candidate.passed and self.split_failed and len(batch) > 1:
            with self.ledger.transaction() as tx:
                tx.end_round(round_id, "split", reason=f"{candidate.reason}; its {len(batch)} requests "
                                                       "are retried in two rounds of half as many")
            bound.warning("round_split", reason=candidate.reason, requests=len(batch))
            failpoint("after_round_split")
            return RoundOutcome("split", result)
        if not candidate.passed:
            self._fail(rt, candidate, round_id, method)
            bound.warning("round_failed", reason=candidate.reason)
            return RoundOutcome("failed", result)
        drafts = self._drafts(rt, candidate, round_id, method)
        try:
            self.ledger.begin_commit(round_id, rt.version, [d.draft_dict() for d in drafts], fence=(rt.name, epoch))
            failpoint("after_begin_commit")
            info = rt.publish(candidate, round_id, method, owner_epoch=epoch, set_latest=False)
            self._move_latest(rt.name, info, epoch)
            failpoint("after_registry_write")
            mirror_publish(self.mirror, rt.name, info.version, should_abort=should_abort)    # step 2b
            self._commit(round_id, rt.name, info, drafts, epoch)
        except StaleOwner as exc:
            # a newer owner resolves this round (its takeover recovery) and applies its requests: nothing here
            # decides them; a round still running (refused at step 1) is ended here, once
            self.ledger.abandon_if_running(round_id, str(exc))
            bound.warning("round_refused_stale_owner", epoch=epoch, current=exc.current, detail=str(exc))
            return RoundOutcome("stale", result)
        failpoint("after_ledger_commit")
        self._prune(rt.name)
        metrics = candidate.metrics
        bound.info("round_committed", version=info.version, steps=result.steps, forget_accuracy=result.acc_forget,
                   probe_accuracy=metrics.probe_accuracy_after if metrics else None, engine_s=round(result.wall_s, 2))
        return RoundOutcome("applied", result, metrics, info)

    def _drafts(self, rt: ModelRuntime, c: Candidate, round_id: str, method: Mapping[str, Any]
                ) -> list[AppliedReceipt]:
        metrics = c.metrics
        before, after = c.per_request(c.result.predictions_before), c.per_request(c.result.predictions_after)
        goal, membership = rt.goal(c.requests), _membership(c.result)
        return [AppliedReceipt(
            request_id=p.request_id, model=rt.name, kind=p.decoded.kind, round_id=round_id,
            previous_version=rt.version, method=method,
            instances=instance_outcomes(p.id_hashes, p.labels, b, a, p.targets),
            forget_accuracy=metrics.forget_accuracy if metrics else None,
            probe_accuracy_before=metrics.probe_accuracy_before if metrics else None,
            probe_accuracy_after=metrics.probe_accuracy_after if metrics else None,
            received_at=p.received_at, forget_class=p.decoded.forget_class,
            content_hashes=tuple(content_sha256_rows(torch.stack([i.x for i in p.decoded.instances]), rt.id_key)),
            goal=goal, membership=membership)
            for p, b, a in zip(c.requests, before, after, strict=True)]

    def _move_latest(self, model: str, info: registry.VersionInfo, epoch: int | None) -> None:
        """Step 2's last act: ``LATEST`` moves to the new version, unless a newer owner exists (issue 24:
        :func:`~daemon.pipeline.ownership.check_publish` against the manifest ``LATEST`` names and the ledger)."""
        latest = registry.latest_version(self.registry_dir, model)
        manifest = registry.read_manifest(self.registry_dir, model, latest) if latest is not None else None
        check_publish(model, epoch, manifest, self.ledger.ownership_epoch(model))
        if latest is not None and latest >= info.version:
            return                                      # a roll-forward of a version already live
        registry.set_latest(self.registry_dir, model, info.version, verify=False)

    def _commit(self, round_id: str, model: str, info: registry.VersionInfo, drafts: Sequence[AppliedReceipt],
                epoch: int | None = None) -> None:
        """Step 3: the round, its requests, its receipts and the model event, in one transaction (fenced with the
        ownership epoch: a stale owner's commit raises ``StaleOwner`` and writes nothing)."""
        applied_at = time.time()
        with self.ledger.transaction() as tx:
            tx.fence(model, epoch)
            tx.end_round(round_id, "committed", version=info.version)
            for d in drafts:
                tx.finish(d.request_id, "applied", model=model, kind=d.kind, round_id=round_id,
                          model_version=info.version)
                tx.add_forgotten(model, [i.id_sha256 for i in d.instances], round_id)
                tx.add_forgotten_content(model, [
                    ForgottenContent(c, i.id_sha256, d.request_id, round_id, d.kind, i.label, i.target, d.forget_class)
                    for i, c in zip(d.instances, d.content_hashes, strict=False)])
                self.receipts.append(tx, d.completed(version=info.version, sha256=info.sha256, applied_at=applied_at))
            event = {"schema": MODEL_EVENT_SCHEMA, "model": model, "version": info.version, "sha256": info.sha256,
                     "path": str(info.path), "round_id": round_id}
            tx.enqueue(self.models_topic, model.encode(), canonical_json(event))

    def _fail(self, rt: ModelRuntime, c: Candidate, round_id: str, method: Mapping[str, Any]) -> None:
        now = time.time()
        reason = c.reason or "failed"
        with self.ledger.transaction() as tx:
            tx.end_round(round_id, "failed", reason=c.reason)
            for p, before in zip(c.requests, c.per_request(c.result.predictions_before), strict=True):
                receipt = FailedReceipt(
                    request_id=p.request_id, model=rt.name, kind=p.decoded.kind, round_id=round_id, reason=reason,
                    current_version=rt.version, method=method,
                    instances=instance_outcomes(p.id_hashes, p.labels, before, None, None),
                    forget_accuracy=c.result.acc_forget, received_at=p.received_at, failed_at=now)
                tx.finish(p.request_id, "failed", model=rt.name, kind=p.decoded.kind, reason=c.reason,
                          round_id=round_id, model_version=rt.version)
                self.receipts.append(tx, receipt)

    def _prune(self, model: str) -> None:
        """Retention: keep the newest N versions (never LATEST, never one a server's lease holds)."""
        if not self.keep_versions:
            return
        from daemon.registry.ops import prune

        try:
            result = prune(self.registry_dir, model, keep=self.keep_versions)
            if result.deleted:
                log.info("versions_pruned", model=model, deleted=result.deleted, protected=result.protected)
        except (OSError, ValueError, registry.RegistryError) as exc:
            log.warning("prune_failed", model=model, error=str(exc))

    # -- start-up -----------------------------------------------------------------------------------
    def recover(self, owner: str, runtimes: Mapping[str, ModelRuntime]) -> None:
        """Resolve the rounds ``owner`` (this instance) left unfinished when it last stopped (or died).

        Each is resolved under the model's ownership epoch as it stands now: if another daemon takes the model over
        meanwhile, the resolution is refused and left to it (its takeover resolves every unfinished round)."""
        for state in ("running", "committing"):
            for r in self.ledger.rounds_in_state(state, owner):
                try:
                    self._resolve(r, state, runtimes.get(r["model"]), self.ledger.ownership_epoch(r["model"]))
                except StaleOwner as exc:
                    log.warning("round_left_to_new_owner", round_id=r["round_id"], detail=str(exc))
        for name in runtimes if self.mirror is not None else ():
            pushed = self.mirror.catch_up(name, hook=s3_failpoint)   # a first version (pretrained, imported)
            if pushed is not None:
                log.info("registry_pushed", model=name, version=pushed, url=self.mirror.url)

    def take_over(self, model: str, me: str, rt: ModelRuntime | None, epoch: int, *, reload: bool = True) -> int:
        """A model just taken over (issue 24): resolve the rounds of it that other daemons left unfinished, as
        :meth:`recover` does for this daemon's own (running: abandoned; committing: rolled forward when its version
        is in the registry, else abandoned), fenced with the new ``epoch``; then load ``LATEST`` (the continual
        state with it) if it is not the live version. Returns how many rounds were resolved. Raises ``StaleOwner``
        when yet another daemon took the model meanwhile.

        With a bucket (``registry.url``), its ``LATEST`` comes into the working copy first: on hosts with their own
        disks the previous owner published there last, and a round resolved here must build on it."""
        if reload and self.mirror is not None:
            pulled = self.mirror.pull_latest(model)
            if pulled is not None:
                log.info("registry_pulled", model=model, version=pulled, url=self.mirror.url, reason="takeover")
        resolved = 0
        for state in ("running", "committing"):
            for r in self.ledger.rounds_in_state(state, model=model):
                if r["owner"] == me:
                    continue                    # this daemon's own round (running on its round thread)
                self._resolve(r, state, rt, epoch, reload=reload)
                resolved += 1
        if reload and rt is not None and not rt.is_current():
            rt.reload()
        return resolved

    def _resolve(self, r: Mapping[str, Any], state: str, rt: ModelRuntime | None, epoch: int | None, *,
                 reload: bool = True) -> None:
        found = self._find_version(r["model"], r["round_id"]) if (rt and state == "committing") else None
        if found is None and rt and state == "committing" and self.mirror is not None:
            found = self.mirror.pull_round(r["model"], r["round_id"])    # the working copy was lost
        if found is None:
            with self.ledger.transaction() as tx:
                tx.fence(r["model"], epoch)
                tx.end_round(r["round_id"], "abandoned", reason="the daemon stopped before the version was durable")
            log.warning("round_abandoned", round_id=r["round_id"], state=state, owner=r.get("owner"))
            return
        log.warning("round_rolled_forward", round_id=r["round_id"], version=found.version, owner=r.get("owner"))
        self._move_latest(r["model"], found, epoch)
        mirror_publish(self.mirror, r["model"], found.version)    # completes a push cut short
        self._commit(r["round_id"], r["model"], found, [AppliedReceipt.from_draft(d) for d in r["drafts"]], epoch)
        if rt is not None and reload:
            rt.reload()

    def _find_version(self, model: str, round_id: str) -> registry.VersionInfo | None:
        return find_version(self.registry_dir, model, round_id)

    def _adopt(self, name: str, version: int | None, round_id: str) -> None:
        """LATEST comes from a round the ledger never recorded: adopt it, or say why not."""
        setting = "state.dir" if self.ledger.engine == "sqlite" else "state.url"
        if _DAEMON_ROUND.fullmatch(round_id):
            raise StartupError(f"model {name!r}: LATEST (version {version}) comes from round {round_id}, "
                               f"unknown to the ledger at {self.ledger.where}: is {setting} the one this "
                               f"registry was written with?")
        last = self.ledger.last_committed_version(name)
        if last is not None:
            raise StartupError(f"model {name!r}: LATEST (version {version}) comes from round {round_id}, written "
                               f"outside the daemon after the ledger at {self.ledger.where} committed version "
                               f"{last}: the registry is ahead of its ledger; roll back to version {last} "
                               f"(unlearnd registry rollback) or start on a fresh {setting} to adopt it")
        log.info("registry_adopted", model=name, version=version, round_id=round_id)

    def check_consistency(self, runtimes: Mapping[str, ModelRuntime]) -> None:
        """Refuse to start when the registry and the ledger disagree (a wrong state.dir, a registry restored).

        LATEST from a round this daemon's ledger does not know is adopted only when that round was written
        outside any daemon (``unlearnd import`` has none, ``unlearnd unlearn`` names its rounds
        ``unlearn-…``, or ``r-<hex>`` before) *and* the ledger has committed no version of this model: a
        fresh state.dir on a registry the operator built by hand. A daemon round id (``r-000042``) the
        ledger lacks, or an offline round on top of versions the ledger committed, is a registry ahead of
        its ledger: refused.
        """
        for name, rt in runtimes.items():
            manifest = rt.live.info.manifest if rt.live else {}
            round_id = manifest.get("round_id")
            state = self.ledger.round_state(round_id) if round_id else None
            if round_id and state not in ("committed", None):
                raise StartupError(f"model {name!r}: LATEST (version {rt.version}) comes from round {round_id}, "
                                   f"which the ledger records as {state}")
            if round_id and state is None:
                self._adopt(name, rt.version, round_id)
            last = self.ledger.last_committed_version(name)
            highest = max(registry.list_versions(self.registry_dir, name), default=0)
            if last is not None and highest < last:
                raise StartupError(f"model {name!r}: the ledger recorded version {last}, but the registry's "
                                   f"highest is {highest}: the registry at {self.registry_dir} lost versions")


def find_version(registry_dir: Path, model: str, round_id: str) -> registry.VersionInfo | None:
    """The version a round (or a rebase) wrote, verified, if it reached the registry."""
    for v in reversed(registry.list_versions(registry_dir, model)):
        try:
            manifest = registry.read_manifest(registry_dir, model, v)
        except registry.RegistryError:
            continue
        if manifest.get("round_id") == round_id:
            return registry.verify_version(registry_dir, model, v)
    return None


def _membership(result: RoundResult) -> dict[str, Any] | None:
    """The receipt's ``membership``: the round's evidence (one batch, one AUC over all of its instances), what
    stopped it and in how many steps (``already_unseen`` with 0 steps: the model was left as it was)."""
    if result.membership is None:
        return None
    return {**result.membership.to_dict(), "stopped_by": result.stopped_by, "steps": result.steps,
            "check_s": round(result.check_s, 4)}
