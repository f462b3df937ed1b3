"""The daemon: Kafka requests in, crash-safe unlearning rounds, receipts and metrics out.

One main thread owns the Kafka consumer (kafka-python's consumer is not thread-safe): it polls,
decodes, records every message's effect in the ledger (:mod:`daemon.pipeline.intake`), commits safe
offsets (:mod:`daemon.pipeline.offsets`), and starts rounds when the batcher says one is due
(:mod:`daemon.pipeline.batcher`). A round runs on a worker thread (:mod:`daemon.pipeline.commit`, where
the commit order is explained) while the main thread keeps polling with the partitions paused, so a
long round never makes the daemon leave its group.

A rebase (:mod:`daemon.pipeline.rebase`) trains on a thread of its own, at the rounds' CPU policy, while rounds
go on; its finish (re-application, gate, publish) then runs on the round thread in place of a round.

:class:`Daemon` owns the lifecycle: start-up, the loop, the grace period on a stop, the shutdown order; its
parts are opened and wired from the configuration by :func:`daemon.pipeline.assembly.build_daemon`.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
import torch
from kafka import OffsetAndMetadata, TopicPartition
from kafka.errors import KafkaError

from daemon.pipeline.batcher import Batcher
from daemon.pipeline.commit import RoundCommitter, RoundOutcome, StartupError
from daemon.pipeline.config import Config
from daemon.pipeline.intake import Intake
from daemon.pipeline.kafka_io import check_broker_tls, ensure_topics
from daemon.pipeline.ledger import Ledger, LedgerUnavailable
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.offsets import OffsetBook
from daemon.pipeline.outbox import OutboxPublisher
from daemon.pipeline.owners import Owners
from daemon.pipeline.rebalance import Rebalance, drop_model
from daemon.pipeline.pending import PendingRequest
from daemon.pipeline.rebase import (
    RebaseAborted,
    RebaseCommitInterrupted,
    RebaseOutcome,
    Rebaser,
    RebaseRefused,
    TrainedRebase,
)
from daemon.pipeline.runtime import ModelRuntime
from daemon.pipeline.stranded import PartitionView, StrandedWatch

__all__ = ["EXIT_LEDGER_LOST", "BrokerUnavailable", "Daemon", "StartupError"]

log = structlog.get_logger("unlearnd.daemon")

OFFSET_COMMIT_INTERVAL_S = 1.0
# How often an idle daemon looks whether LATEST moved (a rollback, a rebase, another daemon's round), so its
# gauges follow the served version without waiting for the next request; a round due reloads at once anyway.
LATEST_CHECK_INTERVAL_S = 10.0
REBASE_CHECK_INTERVAL_S = 1.0       # how often the loop looks for a requested rebase or a policy that asks for one
STRANDED_CHECK_INTERVAL_S = 1.0     # how often the loop looks for accepted requests it no longer holds
LEDGER_BACKOFF_S = (0.5, 5.0)       # first and longest wait before reading a poll again while the ledger is away
EXIT_LEDGER_LOST = 75               # EX_TEMPFAIL: the ledger went away inside a round, or a rebase's publish broke off;
                                    # start-up recovery resolves it
QUIET_S = 2.0                       # polls empty (nothing paused) this long: the consumer has read its partitions


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached at start-up (transient: exit 1, a supervisor retries)."""


class _RunningRebase:
    """The rebase in progress: its training future, then its finish future (on the round thread)."""

    def __init__(self, rebase_id: str, model: str, train: Future[TrainedRebase], abort: threading.Event) -> None:
        self.rebase_id = rebase_id
        self.model = model
        self.train = train
        self.abort = abort
        self.finish: Future[RebaseOutcome] | None = None


class Daemon:
    """``unlearnd run``: :meth:`start`, then :meth:`run` until ``stop`` is set; :meth:`shutdown` is idempotent."""

    def __init__(self, config: Config, *, metrics: DaemonMetrics, ledger: Ledger, runtimes: Mapping[str, ModelRuntime],
                 intake: Intake, committer: RoundCommitter, batcher: Batcher, offsets: OffsetBook,
                 outbox: OutboxPublisher, consumer_factory: Callable[[], Any], executor: ThreadPoolExecutor,
                 stop: threading.Event | None = None, rebaser: Rebaser | None = None,
                 rebase_executor: ThreadPoolExecutor | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.ledger = ledger
        self.runtimes = runtimes
        self.intake = intake
        self.committer = committer
        committer.rebasing = self._rebasing
        self.batcher = batcher
        self.offsets = offsets
        self.outbox = outbox
        self.instance = config.kafka.instance_id
        self.owners = Owners(ledger, self.instance, runtimes)     # the models held, their fencing epochs (issue 24)
        self.rebalance = Rebalance(self)
        self._consumer_factory = consumer_factory
        self._executor = executor
        self._stop = stop or threading.Event()
        self._abort = threading.Event()
        self.consumer: Any = None
        self._round: Future[RoundOutcome] | None = None
        self._round_started = 0.0
        self._round_epoch: int | None = None        # the ownership epoch the running round started under
        self._metrics_server: Any = None
        self._last_commit = 0.0
        self._last_latest_check = time.monotonic()
        self._closed = False
        self.rebaser = rebaser
        self._rebase_executor = rebase_executor
        self._rebase: _RunningRebase | None = None
        self._rebase_check = 0.0
        self.stranded = StrandedWatch(ledger, intake.receipts, after_s=config.daemon.stranded_after_s,
                                      versions=lambda m: self.runtimes[m].version if m in self.runtimes else None)
        self._stranded_check = 0.0
        self._empty_since: float | None = None      # monotonic: since when polls come back empty, nothing paused
        self._ledger_outage = 0                     # consecutive calls that found the ledger away (the backoff)
        self._exit_code = 0

    # -- start-up -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Resolve unfinished rounds, check the state, export the gauges, reach the broker and subscribe."""
        self.committer.recover(self.instance, self.runtimes)
        if self.rebaser is not None:
            self.rebaser.recover(self.runtimes)
        self.committer.check_consistency(self.runtimes)
        for name in self.runtimes:
            self._export_loaded(name)
        if self.config.metrics.port:
            from daemon.pipeline.metrics_http import metrics_tls, metrics_token

            m = self.config.metrics
            self._metrics_server = self.metrics.serve(m.host, m.port, tls=metrics_tls(m), token=metrics_token(m))
        self._ensure_topics()
        self.outbox.start()
        k = self.config.kafka
        self.consumer = self._consumer_factory()
        self.consumer.subscribe([k.requests_topic], listener=self.rebalance)
        # Start-up leaves ~200,000 long-lived objects (torch, the models, the data sets) that Python's cyclic
        # garbage collector would walk on every full collection, ~0.1 s each, several times a second under an
        # intake flood. They live as long as the daemon: collect once, then move them out of the collector's view.
        gc.collect()
        gc.freeze()
        log.info("daemon_started", instance=self.instance, models={n: r.version for n, r in self.runtimes.items()},
                 registry=self.config.registry.url or self.config.registry.dir, state=str(Path(self.config.state.dir)))

    def _ensure_topics(self) -> None:
        k = self.config.kafka
        deadline = time.monotonic() + k.startup_wait_s
        while True:
            try:
                if k.create_topics:
                    ensure_topics(k, [k.requests_topic, k.receipts_topic, k.dlq_topic, k.models_topic],
                                  {k.requests_topic: k.partitions})
                else:
                    check_broker_tls(k)      # what creating the topics would have checked first
                return
            except KafkaError as exc:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise BrokerUnavailable(f"cannot reach the broker at {k.bootstrap} "
                                            f"(kafka.bootstrap): {exc}") from exc
                log.warning("broker_unreachable", bootstrap=k.bootstrap, error=str(exc), retry_s=2)
                time.sleep(2)

    # -- main loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Poll, decide, run rounds until a stop is asked; a running round gets ``rounds.grace_period_s``."""
        if self.consumer is None:
            raise RuntimeError("start() the daemon before run()")
        grace_deadline: float | None = None
        while True:
            if self._stop.is_set():
                if self._rebase is not None:
                    self._rebase.abort.set()        # training stops at its next step; the job runs again later
                if self._round is None and (self._rebase is None or self._rebase.finish is None):
                    break
                if grace_deadline is None:
                    grace_deadline = time.monotonic() + self.config.rounds.grace_period_s
                    log.info("stopping", waiting_for_round=True, grace_s=self.config.rounds.grace_period_s)
                elif time.monotonic() > grace_deadline and not self._abort.is_set():
                    log.warning("round_aborting", reason="grace period over")
                    self._abort.set()
            self._poll_once()
            self._finish_round_if_done()
            self._rebase_step()
            if not self._stop.is_set():
                self.rebalance.retry_deferred()     # a takeover that found the ledger away (issue 24)
            if not self._stop.is_set() and self._round is None and not self._rebase_finishing():
                self._start_round_if_due()
            if not self._stop.is_set() and self._round is None and not self._rebase_finishing():
                self._follow_latest()       # never beside a rebase's finish: it reloads the model itself
            if not self._stop.is_set():
                self._stranded_step()
            self._update_gauges()
        self.shutdown()
        return self._exit_code

    def shutdown(self) -> None:
        """Commit what is safe, flush the outbox a while, leave the group, stop the threads, close the ledger."""
        if self._closed:
            return
        self._closed = True
        self._commit_offsets()
        try:
            self.outbox.stop(flush_timeout_s=5.0)
        except LedgerUnavailable as exc:        # what it could not publish waits in the ledger for the next start
            log.warning("outbox_flush_skipped", error=str(exc))
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)
            except KafkaError:
                pass
        self._executor.shutdown(wait=True)
        self._stop_rebase()
        if self._metrics_server is not None:
            server, _thread = self._metrics_server
            server.shutdown()
        self.ledger.close()
        log.info("daemon_stopped", instance=self.instance)

    def _poll_once(self) -> None:
        try:
            batches = self.consumer.poll(timeout_ms=self.config.kafka.poll_timeout_ms)
        except KafkaError as exc:
            log.warning("poll_failed", error=str(exc))
            time.sleep(0.5)
            return
        records = [rec for recs in batches.values() for rec in recs]
        if records or self.consumer.paused():
            self._empty_since = None
        elif self._empty_since is None:
            self._empty_since = time.monotonic()
        if not records:
            self._commit_offsets()
            return
        try:
            queued = self.intake.process(records)
        except LedgerUnavailable as exc:
            self._read_again_later(records, exc)
            return
        self._ledger_outage = 0
        if queued:
            self.outbox.wake()
        # every effect is in the ledger now, so committing is safe; while messages keep coming it is done at most
        # every OFFSET_COMMIT_INTERVAL_S (a synchronous round trip per poll would cost a flood ~10%), and at once
        # when a poll comes back empty, a round ends, partitions are revoked or the daemon stops. What a crash
        # leaves uncommitted is redelivered and recognised by the ledger (same offset, same fingerprint).
        self._commit_offsets(due_only=True)

    def _read_again_later(self, records: list[Any], exc: LedgerUnavailable) -> None:
        """The ledger went away while deciding a poll: nothing of it took effect (the intake touches the batcher
        and the offsets only after its transaction commits), so the consumer is moved back to the poll's first
        offsets and the same messages are read again after a backoff, for as long as the outage lasts."""
        first: dict[TopicPartition, int] = {}
        for rec in records:
            tp = TopicPartition(rec.topic, rec.partition)
            first[tp] = min(first.get(tp, rec.offset), rec.offset)
        for tp, offset in first.items():
            self.consumer.seek(tp, offset)
        self._ledger_away(exc, messages=len(records))

    def _ledger_away(self, exc: LedgerUnavailable, **fields: Any) -> None:
        """Count, log and wait out one failed call (exponential backoff, cut short by a stop)."""
        self._ledger_outage += 1
        self.metrics.ledger_unavailable.inc()
        first, longest = LEDGER_BACKOFF_S
        wait = min(longest, first * 2 ** (self._ledger_outage - 1))
        log.warning("ledger_unavailable", error=str(exc), retry_s=wait, attempt=self._ledger_outage, **fields)
        self._stop.wait(wait)

    # -- offsets ------------------------------------------------------------------------------------
    def _commit_offsets(self, *, due_only: bool = False) -> None:
        if self.consumer is None:
            return
        if due_only and time.monotonic() - self._last_commit < OFFSET_COMMIT_INTERVAL_S:
            return
        self._last_commit = time.monotonic()
        todo = self.offsets.to_commit(self.consumer.assignment())
        if not todo:
            return
        try:
            self.consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in todo.items()})
            self.offsets.mark_committed(todo)
        except (KafkaError, AssertionError) as exc:
            log.warning("offset_commit_failed", error=str(exc))

    def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Partitions leave this daemon (:mod:`daemon.pipeline.rebalance`: dropped once known to be gone)."""
        self.rebalance.revoked(revoked)

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Partitions come (issue 24: their models are taken over, :mod:`daemon.pipeline.rebalance`)."""
        self.rebalance.assigned(assigned)

    # -- rounds -------------------------------------------------------------------------------------
    def _start_round_if_due(self) -> None:
        batch = self.batcher.next_due(time.monotonic())
        if batch is None:
            return
        model = batch[0].model
        rt = self.runtimes[model]
        self._reload_if_moved(model)
        epoch = self._round_epoch = self.owners.epoch(model)
        try:
            round_id = self.ledger.allocate_round(model, self.instance, [p.request_id for p in batch])
        except LedgerUnavailable as exc:        # nothing allocated: the batch waits in front of its queue
            self.batcher.retry(self.batcher.settle(), time.monotonic())
            self._ledger_away(exc, model=model)
            return
        self._round_started = time.monotonic()
        self._abort.clear()
        self.consumer.pause(*self.consumer.assignment())
        log.info("round_started", round_id=round_id, model=model, requests=len(batch),
                 instances=sum(p.size for p in batch), kind=batch[0].decoded.kind)
        self._round = self._executor.submit(self.committer.run, rt, batch, round_id, self._abort.is_set, epoch)

    def _reload_if_moved(self, model: str) -> None:
        """Load LATEST when it is not the live version any more, and export the gauges of the version now live."""
        rt = self.runtimes[model]
        if rt.is_current():
            return
        log.info("model_reloaded", model=model, reason="LATEST moved (rollback, rebase or another daemon)")
        rt.reload()
        self._export_loaded(model)

    def _follow_latest(self) -> None:
        """Between rounds, every LATEST_CHECK_INTERVAL_S: reload a model whose LATEST moved."""
        now = time.monotonic()
        if now - self._last_latest_check < LATEST_CHECK_INTERVAL_S:
            return
        self._last_latest_check = now
        for model in self.runtimes:
            try:
                self._reload_if_moved(model)
            except Exception as exc:  # noqa: BLE001 - a broken new version: the next round's reload reports it
                log.warning("model_reload_failed", model=model, error=f"{type(exc).__name__}: {exc}")

    def _finish_round_if_done(self) -> None:
        if self._round is None or not self._round.done():
            return
        future, self._round = self._round, None
        batch = self.batcher.settle()
        duration = time.monotonic() - self._round_started
        try:
            outcome: RoundOutcome | None = future.result()
        except LedgerUnavailable as exc:
            # where in the round it struck is not known here (before its intent, or between the registry write and
            # the commit): stopping hands the round to start-up recovery, which resolves exactly that case
            log.error("ledger_lost_in_round", error=str(exc), exit_code=EXIT_LEDGER_LOST,
                      detail="stopping; the restart resolves the round and its requests are read again")
            self.metrics.ledger_unavailable.inc()
            self._exit_code = EXIT_LEDGER_LOST
            self._stop.set()
            return
        except Exception as exc:  # noqa: BLE001 - a crashed round leaves its requests pending
            log.exception("round_crashed", error=str(exc))
            outcome = None
        if self.consumer is not None:
            self.consumer.resume(*self.consumer.paused())
        if outcome is not None and outcome.status == "deferred":
            # refused by the gate while the model's rebase runs: the requests wait for the rebase (it resets the
            # headroom) in front of their queue; nothing of the model runs until it ends (unless it already did)
            self.metrics.rounds.labels(outcome="deferred").inc()
            self.batcher.retry(batch, time.monotonic())
            if self._rebasing(batch[0].model):
                self.batcher.held.add(batch[0].model)
            return
        if outcome is not None and outcome.status == "stale":   # not decided here: their offsets stay uncommitted
            model = batch[0].model
            if self.owners.epoch(model) == self._round_epoch:      # not taken back since the round began
                drop_model(self, model, "a newer owner refused this round's commit")
            for tp in {TopicPartition(p.topic, p.partition) for p in batch} if self.owners.epoch(model) else ():
                self.rebalance.rewind(tp)       # taken back meanwhile: read them again, the ledger decides each one
            return
        if outcome is None or outcome.status == "aborted":
            # nothing published, no offsets committed: the requests stay pending (redelivered on restart)
            self.metrics.rounds.labels(outcome="aborted").inc()
            if not self._stop.is_set():
                self.batcher.retry(batch, time.monotonic())
            return
        self.metrics.rounds.labels(outcome="failed" if outcome.status == "split" else outcome.status).inc()
        self.metrics.round_duration.observe(duration)
        if outcome.status == "split":
            # nothing decided: the requests stay in flight (their offsets uncommitted) and run again in halves,
            # so one request that cannot be unlearned fails alone instead of taking its batch with it
            self.batcher.split(batch)
            self.metrics.forget_accuracy.set(outcome.result.acc_forget)
            return
        self._decided(batch, outcome)

    def _decided(self, batch: list[PendingRequest], outcome: RoundOutcome) -> None:
        """The round's requests have their receipts (applied or failed): release their offsets, count them."""
        for p in batch:
            self.offsets.release(TopicPartition(p.topic, p.partition), p.offset)
            self.metrics.requests.labels(kind=p.decoded.kind, status=outcome.status).inc()
        model = batch[0].model
        if outcome.status == "applied" and outcome.version is not None and outcome.metrics is not None:
            now = time.time()
            for p in batch:
                self.metrics.time_to_forget.observe(now - p.received_at)
            self.metrics.export_round(model, outcome.version.version, outcome.metrics)
            self.metrics.export_membership(model, outcome.result.membership)
            self._export_capacity(model)
            self._notify(model)
        else:
            self.metrics.forget_accuracy.set(outcome.result.acc_forget)
        self.outbox.wake()
        self._commit_offsets()

    def _export_loaded(self, model: str) -> None:
        """The gauges of a version just loaded (start-up, a reload): its number, probe accuracy, capacity."""
        rt = self.runtimes[model]
        self.metrics.model_version.labels(model=model).set(rt.version)
        self.metrics.probe_accuracy.labels(reference="original").set(rt.probe_accuracy("original"))
        self.metrics.probe_accuracy.labels(reference="current").set(rt.probe_accuracy("current"))
        self._export_capacity(model)

    def _export_capacity(self, model: str) -> None:
        """What is left of the model's capacity to forget (docs/operations.md, "Capacity"): retention headroom
        over the gate's floor, the memory's fill, deletions since the lineage's base. Called whenever the live
        version changes: start-up, an applied round, a reload (a rollback, a rebase, another daemon's version)."""
        rt = self.runtimes[model]
        if rt.live is None:
            return
        self.metrics.export_memory_fill(model, rt.live.session.memory.fill())
        self.metrics.export_capacity(model, headroom=rt.retention_headroom(), floor=rt.gate_floor(),
                                     deletions=rt.deletions_since_base)

    def _notify(self, model: str) -> None:
        urls = [u.replace("{name}", model) for u in self.config.serving.notify_urls]
        if not urls:
            return
        from daemon.pipeline.metrics_http import notify_token
        from daemon.serving.notify import client_ssl_context, notify_reload

        s = self.config.serving
        kwargs = {"timeout": s.notify_timeout_s, "ssl_context": client_ssl_context(s.notify_ca_file or None),
                  "token": notify_token(s)}
        threading.Thread(target=notify_reload, args=(urls,), kwargs=kwargs, name="notify", daemon=True).start()

    # -- rebases -----------------------------------------------------------------------------------------
    def _rebase_finishing(self) -> bool:
        return self._rebase is not None and self._rebase.finish is not None

    def _rebase_step(self) -> None:
        """Start a rebase that is due, hand a trained one to the round thread, record one that ended."""
        if self.rebaser is None or self._rebase_executor is None:
            return
        job = self._rebase
        if job is None:
            if not self._stop.is_set() and time.monotonic() - self._rebase_check >= REBASE_CHECK_INTERVAL_S:
                self._rebase_check = time.monotonic()
                self._start_rebase_if_due()
            return
        if job.finish is not None:
            if job.finish.done():
                try:
                    outcome = job.finish.result()
                except RebaseCommitInterrupted as exc:       # its version may be written: the restart resolves it
                    log.error("rebase_commit_interrupted", rebase_id=job.rebase_id, error=str(exc),
                              exit_code=EXIT_LEDGER_LOST, detail="stopping; the restart rolls it forward or reruns it")
                    self._exit_code = EXIT_LEDGER_LOST
                    self._stop.set()
                    return
                except Exception as exc:  # noqa: BLE001 - a crashed finish leaves the old lineage serving
                    log.exception("rebase_crashed", rebase_id=job.rebase_id, error=str(exc))
                    outcome = self.rebaser.fail(job.rebase_id, job.model, f"{type(exc).__name__}: {exc}")
                self._rebase_ended(job, outcome)
            return
        if not job.train.done() or self._round is not None or self._stop.is_set():
            return
        try:
            trained = job.train.result()
        except RebaseAborted as exc:
            self._rebase_ended(job, self.rebaser.aborted(job.rebase_id, job.model, str(exc)))
            return
        except RebaseRefused as exc:
            self._rebase_ended(job, self.rebaser.fail(job.rebase_id, job.model, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - a training that crashed fails the rebase, not the daemon
            log.exception("rebase_crashed", rebase_id=job.rebase_id, error=str(exc))
            self._rebase_ended(job, self.rebaser.fail(job.rebase_id, job.model, f"training: {type(exc).__name__}: "
                                                                                  f"{exc}"))
            return
        log.info("rebase_trained", rebase_id=job.rebase_id, model=job.model, train_s=round(trained.seconds, 1),
                 items=len(trained.training.indices), excluded=trained.training.excluded)
        self._abort.clear()
        job.finish = self._executor.submit(self.rebaser.finish, self.runtimes[job.model], trained, self._abort.is_set)

    def _start_rebase_if_due(self) -> None:
        assert self.rebaser is not None and self._rebase_executor is not None
        models = [n for n, rt in self.runtimes.items() if rt.section.rebase.enabled() and n not in self.owners.dropped
                  and n not in self.rebalance.deferred]
        found = self.rebaser.requested(models)
        if found is None:
            for name in models:
                trigger = self.rebaser.due(self.runtimes[name])
                if trigger is not None:
                    found = (self.ledger.request_rebase(name, trigger)[0], name)
                    break
        if found is None:
            return
        rebase_id, model = found
        if not self.ledger.claim_rebase(rebase_id, self.instance):
            return                  # a daemon sharing this ledger runs it
        abort = threading.Event()
        future = self._rebase_executor.submit(self.rebaser.prepare, self.runtimes[model], rebase_id, abort)
        self._rebase = _RunningRebase(rebase_id, model, future, abort)
        self.metrics.rebase_running.labels(model=model).set(1)
        self.metrics.rebase_started.labels(model=model).set(time.time())
        log.info("rebase_started", rebase_id=rebase_id, model=model)

    def _rebasing(self, model: str) -> bool:
        """Whether a rebase of ``model`` is in progress (read by the round thread too: one reference read)."""
        job = self._rebase
        return job is not None and job.model == model

    def _rebase_ended(self, job: _RunningRebase, outcome: RebaseOutcome) -> None:
        self._rebase = None
        self.batcher.held.discard(job.model)        # deferred rounds run again, on the rebased model if committed
        self.metrics.rebases.labels(model=job.model, outcome=outcome.status).inc()
        self.metrics.rebase_running.labels(model=job.model).set(0)
        self.metrics.rebase_started.labels(model=job.model).set(0)
        if outcome.status == "committed" and outcome.version is not None:
            self._export_loaded(job.model)
            self._notify(job.model)
            self.outbox.wake()

    def _stop_rebase(self) -> None:
        """At shutdown: stop the training thread; an unfinished job waits in the ledger to run again."""
        job, self._rebase = self._rebase, None
        if self._rebase_executor is None:
            return
        if job is not None:
            job.abort.set()
        self._rebase_executor.shutdown(wait=True)
        if job is not None and job.finish is None and self.rebaser is not None:
            self.rebaser.aborted(job.rebase_id, job.model, "the daemon stopped")

    # -- accepted requests no longer held (daemon/pipeline/stranded.py) ----------------------------------------
    def _stranded_step(self) -> None:
        """Every STRANDED_CHECK_INTERVAL_S: find accepted requests this daemon does not hold and the broker can no
        longer redeliver; those stranded for ``daemon.stranded_after_s`` get a failed receipt (resubmit)."""
        now = time.monotonic()
        if now - self._stranded_check < STRANDED_CHECK_INTERVAL_S:
            return
        self._stranded_check = now
        topic = self.config.kafka.requests_topic
        view = PartitionView(
            assigned=frozenset(tp for tp in self.consumer.assignment() if tp.topic == topic),
            next_offset=dict(self.offsets.next_offset),
            quiet=self._empty_since is not None and now - self._empty_since >= QUIET_S,
            position=self._position, partitions=lambda t: self.consumer.partitions_for_topic(t))
        try:
            failed = self.stranded.step({p.request_id for p in self.batcher.waiting()}, view)
        except Exception as exc:  # noqa: BLE001 - a failed look is retried at the next interval; never fatal
            log.warning("stranded_check_failed", error=f"{type(exc).__name__}: {exc}")
            return
        for r in failed:
            self.metrics.requests.labels(kind=r.kind or "unknown", status="failed").inc()
        if failed:
            self.outbox.wake()

    def _position(self, tp: TopicPartition) -> int | None:
        try:
            return int(self.consumer.position(tp, timeout_ms=1000))
        except (KafkaError, AssertionError, TypeError, ValueError):
            return None

    def _update_gauges(self) -> None:
        waiting: list[Any] = list(self.batcher.waiting())
        waiting += self.stranded.counted(self.consumer.assignment())     # orphans: counted while they wait
        self.metrics.pending.set(len(waiting))
        now = time.time()
        self.metrics.oldest_pending_age.set(max((now - p.received_at for p in waiting), default=0.0))
        for tp in self.consumer.assignment():
            lag = self.offsets.lag(tp, self.consumer.highwater(tp))
            if lag is not None:
                self.metrics.consumer_lag.labels(partition=str(tp.partition)).set(lag)
