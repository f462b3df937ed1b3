"""The daemon: Kafka requests in, crash-safe unlearning rounds, receipts and metrics out.

One main thread owns the Kafka consumer (kafka-python's consumer is not thread-safe): it polls,
decodes, records every message's effect in the ledger, commits safe offsets, and starts rounds. A
round runs on a worker thread while the main thread keeps polling with the partitions paused, so a
long round never makes the daemon leave its group.

A round commits in this order, each step durable before the next:

1. ledger: the round is ``committing``, with its draft receipts (hashes only);
2. registry: the new version (atomic directory rename, then ``LATEST``);
3. ledger: the round is ``committed``; receipts enter the audit chain and the outbox in one transaction;
4. broker: receipts and the ``unlearn.models`` event leave the outbox; servers are notified;
5. Kafka: the offsets move past the round's messages.

A crash before 2 abandons the round (Kafka redelivers its messages); a crash after 2 is rolled
forward at start-up from the drafts. Nothing is applied twice, because the ledger remembers every
(topic, partition, offset) and every request id.
"""

from __future__ import annotations

import gc
import hashlib
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
import torch
from kafka import ConsumerRebalanceListener, OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from daemon import registry
from daemon.cpu_policy import set_thread_policy
from daemon.service import receipts
from daemon.service.codec import CheckedRequest, Limits, ModelSpec, Rejection, check_request, decode_inputs
from daemon.service.config import Config
from daemon.service.failpoints import failpoint
from daemon.service.kafka_io import ensure_topics, make_consumer
from daemon.service.ledger import IntakeBatch, Ledger, canonical_json
from daemon.service.metrics import DaemonMetrics
from daemon.service.outbox import OutboxPublisher
from daemon.service.runtime import Candidate, ModelRuntime, PendingRequest

__all__ = ["BrokerUnavailable", "Daemon", "StartupError"]

log = structlog.get_logger("unlearnd.daemon")

MODEL_EVENT_SCHEMA = "unlearn.model/v1"
OFFSET_COMMIT_INTERVAL_S = 1.0


class StartupError(RuntimeError):
    """The daemon refuses to start: configuration or state is inconsistent (message says how)."""


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached at start-up (transient: exit 1, a supervisor retries)."""


def _fingerprint(record: Any) -> str:
    h = hashlib.sha256()
    h.update(str(record.timestamp).encode())
    h.update(b"\0" + (record.key or b"") + b"\0" + (record.value or b""))
    return h.hexdigest()[:32]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            self.daemon._on_revoked(set(revoked))
        except Exception as exc:  # noqa: BLE001 - kafka-python turns a raise here into a failed poll
            log.warning("revoke_handling_failed", error=f"{type(exc).__name__}: {exc}")

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


def _round_thread_init(policy: str) -> None:
    """The round thread's CPU policy (``rounds.cpu_policy``): its torch workers, started from it, inherit it."""
    if policy != "normal" and not set_thread_policy(policy):
        log.warning("cpu_policy_unavailable", policy=policy, detail="this OS lacks it: rounds run at normal policy")


class Daemon:
    """``unlearnd run``: call :meth:`start`, then :meth:`run` until :meth:`request_stop`."""

    def __init__(self, config: Config, metrics: DaemonMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or DaemonMetrics()
        self.state_dir = Path(config.state.dir)
        self.registry_dir = Path(config.registry.dir)
        self.instance = config.kafka.instance_id
        self.limits = Limits(max_instances=config.limits.max_instances,
                             max_message_bytes=config.limits.max_message_bytes)
        self.method = {"name": config.rounds.method, "preset": config.rounds.preset,
                       "accumulation": config.rounds.accumulation, "memory_energy": config.rounds.memory_energy,
                       "memory_copies": config.rounds.memory_copies}
        self.runtimes: dict[str, ModelRuntime] = {}
        self.specs: dict[str, ModelSpec] = {}
        self.pending: dict[str, list[PendingRequest]] = defaultdict(list)
        # the halves of failed rounds (``rounds.split_failed``), each run as a round of its own, before new work
        self.split: dict[str, list[list[PendingRequest]]] = defaultdict(list)
        self.first_pending_at: dict[str, float] = {}
        self.inflight: dict[TopicPartition, set[int]] = defaultdict(set)
        self.next_offset: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.ledger: Ledger | None = None
        self.consumer = None
        self.outbox: OutboxPublisher | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round",
                                            initializer=_round_thread_init, initargs=(config.rounds.cpu_policy,))
        self._round: Future | None = None
        self._round_batch: list[PendingRequest] = []
        self._round_started = 0.0
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._metrics_server = None
        self._last_commit = 0.0
        # one log line per rejected or duplicate message only at debug: a flood must not be rendered line by line
        self._log_each = config.log.level.lower() == "debug"

    # -- start-up -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self.config.rounds.threads:
            torch.set_num_threads(self.config.rounds.threads)
        self.ledger = Ledger(self.state_dir / "ledger.sqlite")
        for section in self.config.models:
            rt = ModelRuntime(section, self.registry_dir, self.config.rounds)
            rt.ensure_model(self._pretrain)
            self.runtimes[rt.name] = rt
        self.specs = {n: rt.spec for n, rt in self.runtimes.items()}
        self._recover()
        self._check_consistency()
        for name, rt in self.runtimes.items():
            self.metrics.model_version.labels(model=name).set(rt.version)
            self.metrics.probe_accuracy.labels(reference="original").set(rt.probe_accuracy("original"))
            self.metrics.probe_accuracy.labels(reference="current").set(rt.probe_accuracy("current"))
            self._export_memory_fill(name)
        if self.config.metrics.port:
            self._metrics_server = self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
        k = self.config.kafka
        if k.create_topics:
            deadline = time.monotonic() + k.startup_wait_s
            while True:
                try:
                    ensure_topics(k, [k.requests_topic, k.receipts_topic, k.dlq_topic, k.models_topic],
                                  {k.requests_topic: k.partitions})
                    break
                except KafkaError as exc:
                    if time.monotonic() > deadline or self._stop.is_set():
                        raise BrokerUnavailable(f"cannot reach the broker at {k.bootstrap} "
                                                f"(kafka.bootstrap): {exc}") from exc
                    log.warning("broker_unreachable", bootstrap=k.bootstrap, error=str(exc), retry_s=2)
                    time.sleep(2)
        self.outbox = OutboxPublisher(self.ledger, k, self.metrics, self.config.daemon.outbox_interval_s)
        self.outbox.start()
        self.consumer = make_consumer(k)
        self.consumer.subscribe([k.requests_topic], listener=_Rebalance(self))
        # Start-up leaves ~200,000 long-lived objects (torch, the models, the data sets) that Python's cyclic
        # garbage collector would walk on every full collection, ~0.1 s each, several times a second under an
        # intake flood. They live as long as the daemon: collect once, then move them out of the collector's view.
        gc.collect()
        gc.freeze()
        log.info("daemon_started", instance=self.instance, models={n: r.version for n, r in self.runtimes.items()},
                 registry=str(self.registry_dir), state=str(self.state_dir))

    def _pretrain(self, rt: ModelRuntime) -> None:
        from daemon.engine.models import build_model
        from daemon.engine.session import UnlearningSession
        from daemon.engine.training import TrainConfig, train_classifier
        from daemon.registry import model_store

        splits = rt.splits
        arch = "mnist_cnn" if splits.name == "mnist" else "cifar_resnet18"
        log.info("pretraining", model=rt.name, arch=arch, epochs=rt.section.pretrain_epochs)
        mean, std = splits.mean_std()
        train = TrainConfig(epochs=rt.section.pretrain_epochs)
        torch.manual_seed(train.seed)           # the initial weights are part of the recipe
        model = build_model(arch, num_classes=splits.num_classes, input_shape=splits.input_shape, mean=mean,
                            std=std)
        model.to(self.config.rounds.device)
        train_classifier(model, splits.train_x, splits.train_y, train)
        model.cpu().eval()
        session = UnlearningSession(model, num_classes=splits.num_classes)
        model_store.publish(self.registry_dir, rt.name, model, session, arch=arch, input_shape=splits.input_shape,
                            classes=splits.classes, parent=None, dataset=splits.name,
                            method={"name": "pretrain", "epochs": rt.section.pretrain_epochs})

    def _recover(self) -> None:
        """Resolve the rounds this instance left unfinished when it last stopped (or died)."""
        assert self.ledger is not None
        for state in ("running", "committing"):
            for r in self.ledger.rounds_in_state(state, self.instance):
                rt = self.runtimes.get(r["model"])
                found = self._find_version(r["model"], r["round_id"]) if (rt and state == "committing") else None
                if found is not None:
                    log.warning("round_rolled_forward", round_id=r["round_id"], version=found.version)
                    if registry.latest_version(self.registry_dir, r["model"]) != found.version:
                        if (registry.latest_version(self.registry_dir, r["model"]) or 0) < found.version:
                            registry.set_latest(self.registry_dir, r["model"], found.version)
                    self._commit_round(r["round_id"], r["model"], found, r["drafts"])
                    if rt is not None:
                        rt.reload()
                else:
                    with self.ledger.transaction() as db:
                        Ledger.end_round(db, r["round_id"], "abandoned",
                                         reason="the daemon stopped before the version was durable")
                    log.warning("round_abandoned", round_id=r["round_id"], state=state)

    def _find_version(self, model: str, round_id: str) -> registry.VersionInfo | None:
        for v in reversed(registry.list_versions(self.registry_dir, model)):
            try:
                manifest = registry.read_manifest(self.registry_dir, model, v)
            except registry.RegistryError:
                continue
            if manifest.get("round_id") == round_id:
                return registry.verify_version(self.registry_dir, model, v)
        return None

    def _check_consistency(self) -> None:
        assert self.ledger is not None
        for name, rt in self.runtimes.items():
            manifest = rt.live.info.manifest if rt.live else {}
            round_id = manifest.get("round_id")
            if round_id and self.ledger.round_state(round_id) not in ("committed", None):
                raise StartupError(f"model {name!r}: LATEST (version {rt.version}) comes from round {round_id}, "
                                   f"which the ledger records as {self.ledger.round_state(round_id)}")
            if round_id and self.ledger.round_state(round_id) is None and round_id.startswith("r-"):
                raise StartupError(f"model {name!r}: LATEST (version {rt.version}) comes from round {round_id}, "
                                   f"unknown to the ledger at {self.ledger.path}: is state.dir the one this "
                                   f"registry was written with?")
            last = self.ledger.last_committed_version(name)
            highest = max(registry.list_versions(self.registry_dir, name), default=0)
            if last is not None and highest < last:
                raise StartupError(f"model {name!r}: the ledger recorded version {last}, but the registry's "
                                   f"highest is {highest}: the registry at {self.registry_dir} lost versions")

    # -- main loop ----------------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> int:
        assert self.consumer is not None
        grace_deadline: float | None = None
        while True:
            if self._stop.is_set():
                if self._round is None:
                    break
                if grace_deadline is None:
                    grace_deadline = time.monotonic() + self.config.rounds.grace_period_s
                    log.info("stopping", waiting_for_round=True, grace_s=self.config.rounds.grace_period_s)
                elif time.monotonic() > grace_deadline and not self._abort.is_set():
                    log.warning("round_aborting", reason="grace period over")
                    self._abort.set()
            self._poll_once()
            self._finish_round_if_done()
            if not self._stop.is_set():
                self._start_round_if_due()
            self._update_gauges()
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        self._commit_offsets()
        if self.outbox is not None:
            self.outbox.stop(flush_timeout_s=5.0)
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except KafkaError:
                pass
        self._executor.shutdown(wait=True)
        if self._metrics_server is not None:
            server, _thread = self._metrics_server
            server.shutdown()
        if self.ledger is not None:
            self.ledger.close()
        log.info("daemon_stopped", instance=self.instance)

    # -- intake -------------------------------------------------------------------------------------
    def _poll_once(self) -> None:
        assert self.consumer is not None and self.ledger is not None
        try:
            batches = self.consumer.poll(timeout_ms=self.config.kafka.poll_timeout_ms)
        except KafkaError as exc:
            log.warning("poll_failed", error=str(exc))
            time.sleep(0.5)
            return
        records = [rec for recs in batches.values() for rec in recs]
        if not records:
            self._commit_offsets()
            return
        self.metrics.intake.inc(len(records))
        # the checks that need no ledger (and no pixels) run before the transaction; byte-identical messages of
        # one poll (a replay flood) are checked once: check_request is a pure function of the bytes
        checks: dict[tuple[bytes | None, bytes | None], CheckedRequest | Rejection] = {}
        outcomes = []
        for rec in records:
            k = (rec.key, rec.value)
            got = checks.get(k)
            if got is None:
                try:
                    got = check_request(rec.value, rec.key, self.specs, self.limits)
                except Rejection as rej:
                    got = rej
                checks[k] = got
            outcomes.append(got)
        effects: list[tuple[str, str, str]] = []
        with self.ledger.transaction() as db:
            batch = IntakeBatch(db)
            batch.load([(rec.topic, rec.partition, rec.offset) for rec in records],
                       [c.request_id for c in checks.values() if c.request_id is not None])
            now = time.time()
            for rec, checked in zip(records, outcomes, strict=True):
                effects.append(self._handle(batch, rec, checked, now))
            batch.flush()
        failpoint("after_reject_batch")
        counts: dict[tuple[str, str, str], int] = defaultdict(int)
        for effect in effects:
            counts[effect] += 1
        by_status: dict[str, int] = defaultdict(int)
        for (kind, status, reason), n in counts.items():
            if status:
                self.metrics.requests.labels(kind=kind, status=status).inc(n)
                by_status[status] += n
            if reason:
                self.metrics.dlq.labels(reason=reason).inc(n)
                by_status["dlq"] += n
        if by_status:       # one line per poll, not per message (those are at debug)
            log.info("intake_batch", messages=len(records), **by_status)
        if self.outbox is not None and any(s for _, s, _ in counts):
            self.outbox.wake()
        # every effect is in the ledger now, so committing is safe; while messages keep coming it is done at most
        # every OFFSET_COMMIT_INTERVAL_S (a synchronous round trip per poll would cost a flood ~10%), and at once
        # when a poll comes back empty, a round ends, partitions are revoked or the daemon stops. What a crash
        # leaves uncommitted is redelivered and recognised by the ledger (same offset, same fingerprint).
        self._commit_offsets(due_only=True)

    def _handle(self, batch: IntakeBatch, rec: Any, checked: CheckedRequest | Rejection, now: float
                ) -> tuple[str, str, str]:
        """Record one message's effect; returns (kind, receipt status or '', dlq reason or '')."""
        tp = TopicPartition(rec.topic, rec.partition)
        self.next_offset[tp] = rec.offset + 1    # in order per partition; a broker that lost its log restarts at 0
        fp = _fingerprint(rec)
        seen = batch.delivery(rec.topic, rec.partition, rec.offset)
        if seen is not None and seen.fingerprint == fp:
            if seen.effect != "accepted" or seen.request_status != "accepted":
                return "", "", ""                  # already decided before a restart: nothing to redo
            if any(p.request_id == seen.request_id for p in self._waiting()):
                return "", "", ""
        if isinstance(checked, Rejection):
            return self._reject(batch, rec, fp, checked, now)
        # a replay is recognised before any image is decoded (cheap: the intake must keep up with floods)
        existing = batch.request(checked.request_id)
        redelivered = seen is not None and seen.fingerprint == fp
        if existing is not None and not redelivered:
            receipt = receipts.duplicate(request_id=checked.request_id, model=checked.model, kind=checked.kind,
                                         original=existing, received_at=now)
            self._append(batch, receipt)
            batch.record_delivery(rec.topic, rec.partition, rec.offset, fp, checked.request_id, "duplicate")
            if self._log_each:
                log.debug("request_duplicate", request_id=checked.request_id, original_status=existing["status"])
            return checked.kind, "duplicate", ""
        try:
            decoded = decode_inputs(checked)
            pending = self._prepare(decoded, rec, now)
        except Rejection as rej:
            return self._reject(batch, rec, fp, rej, now)
        if existing is not None:
            pending.received_at = float(existing["received_at"])
        batch.accept(decoded.request_id, decoded.model, decoded.kind, len(decoded.instances), now)
        batch.record_delivery(rec.topic, rec.partition, rec.offset, fp, decoded.request_id, "accepted")
        self.pending[decoded.model].append(pending)
        self.first_pending_at.setdefault(decoded.model, time.monotonic())
        self.inflight[tp].add(rec.offset)
        log.info("request_accepted", request_id=decoded.request_id, model=decoded.model, kind=decoded.kind,
                 instances=len(decoded.instances))
        return "", "", ""

    def _prepare(self, decoded: Any, rec: Any, now: float) -> PendingRequest:
        """Fill in labels from the published model where the request gave none; checks that need them."""
        rt = self.runtimes[decoded.model]
        missing = [i for i, inst in enumerate(decoded.instances) if inst.label is None]
        labels = [inst.label for inst in decoded.instances]
        if decoded.kind == "forget_class":
            labels = [decoded.forget_class if lab is None else lab for lab in labels]
        elif missing:
            preds = rt.predict_at_intake(torch.stack([decoded.instances[i].x for i in missing]))
            for i, p in zip(missing, preds, strict=True):
                labels[i] = p
        targets = None
        if decoded.kind == "relabel":
            targets = [inst.target for inst in decoded.instances]
            for i, (lab, tgt) in enumerate(zip(labels, targets, strict=True)):
                if lab == tgt:
                    raise Rejection("target_equals_label",
                                    f"instances[{i}].target equals the model's current prediction, which stands "
                                    f"in for the missing label", decoded.request_id, decoded.model, decoded.kind)
        return PendingRequest(decoded=decoded, topic=rec.topic, partition=rec.partition, offset=rec.offset,
                              received_at=now, labels=[int(v) for v in labels], targets=targets)

    def _reject(self, batch: IntakeBatch, rec: Any, fp: str, rej: Rejection, now: float) -> tuple[str, str, str]:
        k = self.config.kafka
        headers = [("error.reason", rej.reason.encode()), ("error.detail", rej.detail.encode()),
                   ("source.topic", rec.topic.encode()), ("source.partition", str(rec.partition).encode()),
                   ("source.offset", str(rec.offset).encode())]
        batch.enqueue(k.dlq_topic, rec.key, rec.value if rec.value is not None else b"", headers)
        status = ""
        if rej.request_id is not None:
            receipt = receipts.rejected(request_id=rej.request_id, model=rej.model, kind=rej.kind,
                                        reason=rej.reason, detail=rej.detail, received_at=now)
            if batch.request(rej.request_id) is None:
                batch.finish(rej.request_id, "rejected", model=rej.model, kind=rej.kind, reason=rej.reason,
                             received_at=now)
            self._append(batch, receipt)
            status = "rejected"
        batch.record_delivery(rec.topic, rec.partition, rec.offset, fp, rej.request_id, "rejected")
        if self._log_each:
            log.debug("request_rejected", request_id=rej.request_id, reason=rej.reason, detail=rej.detail,
                      partition=rec.partition, offset=rec.offset)
        return rej.kind or "unknown", status, rej.reason

    def _append(self, db: Any, receipt: dict[str, Any]) -> None:
        """Chain a receipt into the audit trail and the outbox, naming the daemon that decided it.

        ``db``: a connection inside a transaction, or an intake's :class:`IntakeBatch`.
        """
        receipt = {**receipt, "daemon": self.instance}
        if isinstance(db, IntakeBatch):
            db.append_receipt(receipt, self.config.kafka.receipts_topic)
        else:
            Ledger.append_receipt(db, receipt, self.config.kafka.receipts_topic)

    # -- offsets ------------------------------------------------------------------------------------
    def _safe_offsets(self) -> dict[TopicPartition, int]:
        safe = {}
        for tp, nxt in self.next_offset.items():
            waiting = self.inflight.get(tp)
            safe[tp] = min(waiting) if waiting else nxt
        return safe

    def _commit_offsets(self, *, due_only: bool = False) -> None:
        if self.consumer is None:
            return
        if due_only and time.monotonic() - self._last_commit < OFFSET_COMMIT_INTERVAL_S:
            return
        self._last_commit = time.monotonic()
        todo = {tp: off for tp, off in self._safe_offsets().items() if self.committed.get(tp) != off}
        if not todo:
            return
        assigned = self.consumer.assignment()
        todo = {tp: off for tp, off in todo.items() if tp in assigned}
        if not todo:
            return
        try:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in todo.items()})
            self.committed.update(todo)
        except (KafkaError, AssertionError) as exc:
            log.warning("offset_commit_failed", error=str(exc))

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))
        try:
            self._commit_offsets()
        except Exception as exc:  # noqa: BLE001 - the group may already be gone (broker restart)
            log.warning("offset_commit_failed", error=f"{type(exc).__name__}: {exc}")
        for model, halves in list(self.split.items()):
            kept = [[p for p in half if TopicPartition(p.topic, p.partition) not in revoked] for half in halves]
            self.split[model] = [half for half in kept if half]
        for model, items in list(self.pending.items()):
            keep = [p for p in items if TopicPartition(p.topic, p.partition) not in revoked]
            self.pending[model] = keep
            if not keep:
                self.first_pending_at.pop(model, None)
        for tp in revoked:
            self.inflight.pop(tp, None)
            self.next_offset.pop(tp, None)
            self.committed.pop(tp, None)

    # -- rounds -------------------------------------------------------------------------------------
    def _waiting(self) -> Iterator[PendingRequest]:
        """Every accepted request without its outcome yet: pending, split off a failed round, or running."""
        yield from (p for ps in self.pending.values() for p in ps)
        yield from (p for halves in self.split.values() for half in halves for p in half)
        yield from self._round_batch

    def _start_round_if_due(self) -> None:
        if self._round is not None:
            return
        for model, halves in self.split.items():
            if halves:      # the rest of a failed round goes first: its requests are the oldest
                self._launch(model, halves.pop(0))
                return
        now = time.monotonic()
        for model, items in self.pending.items():
            if not items:
                continue
            size = sum(p.size for p in items)
            waited = now - self.first_pending_at.get(model, now)
            if size < self.config.rounds.max_instances and waited < self.config.rounds.max_wait_s:
                continue
            group = items[0].group()
            batch, total = [], 0
            for p in items:
                if p.group() != group:
                    continue
                if batch and total + p.size > self.config.rounds.max_instances:
                    break
                batch.append(p)
                total += p.size
            self.pending[model] = [p for p in items if p not in batch]
            if self.pending[model]:
                self.first_pending_at[model] = now
            else:
                self.first_pending_at.pop(model, None)
            self._launch(model, batch)
            return

    def _launch(self, model: str, batch: list[PendingRequest]) -> None:
        assert self.ledger is not None and self.consumer is not None
        rt = self.runtimes[model]
        if not rt.is_current():
            log.info("model_reloaded", model=model, reason="LATEST moved (rollback or another daemon)")
            rt.reload()
        round_id = self.ledger.allocate_round(model, self.instance, [p.request_id for p in batch])
        self._round_batch = batch
        self._round_started = time.monotonic()
        self._abort.clear()
        self.consumer.pause(*self.consumer.assignment())
        log.info("round_started", round_id=round_id, model=model, requests=len(batch),
                 instances=sum(p.size for p in batch), kind=batch[0].decoded.kind)
        self._round = self._executor.submit(self._run_round, rt, batch, round_id)

    def _run_round(self, rt: ModelRuntime, batch: list[PendingRequest], round_id: str) -> tuple[str, Any]:
        """On the worker thread: compute, gate, and commit durably (steps 1-3)."""
        assert self.ledger is not None
        bound = log.bind(round_id=round_id, model=rt.name)
        candidate = rt.run_round(batch, should_abort=self._abort.is_set)
        if candidate.result.outcome == "aborted":
            with self.ledger.transaction() as db:
                Ledger.end_round(db, round_id, "aborted", reason="stopped within the grace period")
            bound.warning("round_aborted")
            return "aborted", candidate
        method = {**self.method, "params": candidate.result.config.to_dict()}
        if not candidate.passed and self.config.rounds.split_failed and len(batch) > 1:
            with self.ledger.transaction() as db:
                Ledger.end_round(db, round_id, "split", reason=f"{candidate.reason}; its {len(batch)} requests "
                                                               "are retried in two rounds of half as many")
            bound.warning("round_split", reason=candidate.reason, requests=len(batch))
            failpoint("after_round_split")
            return "split", candidate
        if not candidate.passed:
            self._fail_round(rt, candidate, round_id, method)
            bound.warning("round_failed", reason=candidate.reason)
            return "failed", candidate
        drafts = self._drafts(rt, candidate, round_id, method)
        self.ledger.begin_commit(round_id, rt.version, drafts)
        failpoint("after_begin_commit")
        info = rt.publish(candidate, round_id, method)
        failpoint("after_registry_write")
        self._commit_round(round_id, rt.name, info, drafts)
        failpoint("after_ledger_commit")
        self._prune(rt.name)
        bound.info("round_committed", version=info.version, steps=candidate.result.steps,
                   forget_accuracy=candidate.result.acc_forget,
                   probe_accuracy=candidate.metrics.get("probe_accuracy_after"))
        return "applied", (candidate, info)

    def _prune(self, model: str) -> None:
        """Retention: keep the newest N versions (never LATEST, never one a server's lease holds)."""
        keep = self.config.registry.keep_versions
        if not keep:
            return
        from daemon.registry.ops import prune

        try:
            result = prune(self.registry_dir, model, keep=keep)
            if result.deleted:
                log.info("versions_pruned", model=model, deleted=result.deleted, protected=result.protected)
        except (OSError, ValueError, registry.RegistryError) as exc:
            log.warning("prune_failed", model=model, error=str(exc))

    def _slices(self, batch: Sequence[PendingRequest]) -> list[slice]:
        out, start = [], 0
        for p in batch:
            out.append(slice(start, start + p.size))
            start += p.size
        return out

    def _drafts(self, rt: ModelRuntime, c: Candidate, round_id: str, method: dict[str, Any]) -> list[dict]:
        before = c.result.predictions_before.tolist()
        after = c.result.predictions_after.tolist()
        return [receipts.applied_draft(
            request_id=p.request_id, model=rt.name, kind=p.decoded.kind, round_id=round_id,
            previous_version=rt.version, method=method, id_hashes=[i.id_sha256 for i in p.decoded.instances],
            labels=p.labels, targets=p.targets, before=before[s], after=after[s], metrics=c.metrics,
            received_at=p.received_at, forget_class=p.decoded.forget_class)
            for p, s in zip(c.requests, self._slices(c.requests), strict=True)]

    def _commit_round(self, round_id: str, model: str, info: registry.VersionInfo, drafts: list[dict]) -> None:
        assert self.ledger is not None
        applied_at = time.time()
        k = self.config.kafka
        with self.ledger.transaction() as db:
            Ledger.end_round(db, round_id, "committed", version=info.version)
            for d in drafts:
                receipt = receipts.complete_applied(d, version=info.version, sha256=info.sha256,
                                                    applied_at=applied_at)
                Ledger.finish(db, d["request_id"], "applied", model=model, kind=d["kind"], round_id=round_id,
                              model_version=info.version)
                Ledger.add_forgotten(db, model, [i["id_sha256"] for i in d["instances"]], round_id)
                self._append(db, receipt)
            event = {"schema": MODEL_EVENT_SCHEMA, "model": model, "version": info.version, "sha256": info.sha256,
                     "path": str(info.path), "round_id": round_id}
            Ledger.enqueue(db, k.models_topic, model.encode(), canonical_json(event))

    def _fail_round(self, rt: ModelRuntime, c: Candidate, round_id: str, method: dict[str, Any]) -> None:
        assert self.ledger is not None
        before = c.result.predictions_before.tolist()
        now = time.time()
        with self.ledger.transaction() as db:
            Ledger.end_round(db, round_id, "failed", reason=c.reason)
            for p, s in zip(c.requests, self._slices(c.requests), strict=True):
                receipt = receipts.failed(
                    request_id=p.request_id, model=rt.name, kind=p.decoded.kind, round_id=round_id,
                    reason=c.reason or "failed", current_version=rt.version, method=method,
                    id_hashes=[i.id_sha256 for i in p.decoded.instances], labels=p.labels, before=before[s],
                    forget_accuracy=c.result.acc_forget, received_at=p.received_at, finished_at=now)
                Ledger.finish(db, p.request_id, "failed", model=rt.name, kind=p.decoded.kind, reason=c.reason,
                              round_id=round_id, model_version=rt.version)
                self._append(db, receipt)

    def _finish_round_if_done(self) -> None:
        if self._round is None or not self._round.done():
            return
        future, batch = self._round, self._round_batch
        self._round, self._round_batch = None, []
        duration = time.monotonic() - self._round_started
        try:
            outcome, payload = future.result()
        except Exception as exc:  # noqa: BLE001 - a crashed round leaves its requests pending
            log.exception("round_crashed", error=str(exc))
            outcome, payload = "crashed", None
        if self.consumer is not None:
            self.consumer.resume(*self.consumer.paused())
        if outcome in ("aborted", "crashed"):
            # nothing published, no offsets committed: the requests stay pending (redelivered on restart)
            self.metrics.rounds.labels(outcome="aborted").inc()
            if not self._stop.is_set():
                model = batch[0].decoded.model if batch else None
                if model:
                    self.pending[model] = batch + self.pending[model]
                    self.first_pending_at.setdefault(model, time.monotonic())
            return
        if outcome == "split":
            # nothing decided: the requests stay in flight (their offsets uncommitted) and run again in halves,
            # so one request that cannot be unlearned fails alone instead of taking its batch with it
            half = (len(batch) + 1) // 2
            self.split[batch[0].decoded.model][:0] = [batch[:half], batch[half:]]
            self.metrics.rounds.labels(outcome="failed").inc()
            self.metrics.round_duration.observe(duration)
            self.metrics.forget_accuracy.set(payload.result.acc_forget)
            return
        for p in batch:
            self.inflight[TopicPartition(p.topic, p.partition)].discard(p.offset)
        self.metrics.rounds.labels(outcome=outcome).inc()
        self.metrics.round_duration.observe(duration)
        for p in batch:
            self.metrics.requests.labels(kind=p.decoded.kind, status=outcome).inc()
        if outcome == "applied":
            candidate, info = payload
            now = time.time()
            for p in batch:
                self.metrics.time_to_forget.observe(now - p.received_at)
            self._export_round_metrics(batch[0].decoded.model, candidate, info)
            self._notify(batch[0].decoded.model)
        else:
            self.metrics.forget_accuracy.set(payload.result.acc_forget)
        if self.outbox is not None:
            self.outbox.wake()
        self._commit_offsets()

    def _export_round_metrics(self, model: str, c: Candidate, info: registry.VersionInfo) -> None:
        m, g = c.metrics, self.metrics
        g.model_version.labels(model=model).set(info.version)
        g.forget_accuracy.set(m["forget_accuracy"])
        g.probe_accuracy.labels(reference="current").set(m["probe_accuracy_after"])
        g.probe_accuracy.labels(reference="original").set(m["probe_accuracy_original"])
        g.param_drift.labels(reference="original").set(m["param_drift_l2_original"])
        g.param_drift.labels(reference="previous").set(m["param_drift_l2_previous"])
        g.flip_ratio.labels(reference="original").set(m["prediction_flip_ratio_original"])
        g.flip_ratio.labels(reference="previous").set(m["prediction_flip_ratio_previous"])
        g.importance_density.set(m["importance_density_ratio"])
        self._export_memory_fill(model)

    def _export_memory_fill(self, model: str) -> None:
        for layer, share in self.runtimes[model].live.session.memory.fill().items():
            self.metrics.memory_fill.labels(model=model, layer=layer).set(share)

    def _notify(self, model: str) -> None:
        urls = [u.replace("{name}", model) for u in self.config.serving.notify_urls]
        if not urls:
            return
        from daemon.serving.notify import notify_reload

        threading.Thread(target=notify_reload, args=(urls,), kwargs={"timeout": self.config.serving.notify_timeout_s},
                         name="notify", daemon=True).start()

    # -- gauges -------------------------------------------------------------------------------------
    def _update_gauges(self) -> None:
        waiting = list(self._waiting())
        self.metrics.pending.set(len(waiting))
        now = time.time()
        self.metrics.oldest_pending_age.set(max((now - p.received_at for p in waiting), default=0.0))
        if self.consumer is None:
            return
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            if hw is not None and tp in self.next_offset:
                self.metrics.consumer_lag.labels(partition=str(tp.partition)).set(max(0, hw - self.next_offset[tp]))


def run_daemon(config: Config) -> int:
    """Start, run until SIGTERM/SIGINT, stop cleanly. Returns the exit code."""
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    daemon.start()
    return daemon.run()
