"""Assembly: the daemon's parts opened and wired from one :class:`~daemon.pipeline.config.Config`.

Kept apart from :mod:`daemon.pipeline.lifecycle` (what the running daemon does) so that the parts stay injected:
tests and tools build a :class:`~daemon.pipeline.lifecycle.Daemon` from their own ledger, consumer or producer,
and nothing here reaches the broker.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
import torch

from daemon.cpu_policy import set_thread_policy
from daemon.keys import KeyFileError
from daemon.pipeline.batcher import Batcher
from daemon.pipeline.bucket import open_registry, pull_at_start
from daemon.pipeline.codec import Limits
from daemon.pipeline.commit import RoundCommitter
from daemon.pipeline.config import Config
from daemon.pipeline.intake import Intake
from daemon.pipeline.kafka_io import make_consumer
from daemon.pipeline.keyring import open_keys
from daemon.pipeline.ledger import Ledger, LedgerError
from daemon.pipeline.ledger_schema import IdKeyMismatch
from daemon.pipeline.lifecycle import Daemon
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.offsets import OffsetBook
from daemon.pipeline.outbox import OutboxPublisher, kafka_producer_factory
from daemon.pipeline.rebase import Rebaser
from daemon.pipeline.receipts import ReceiptChain
from daemon.pipeline.runtime import ModelRuntime, RuntimeError_

__all__ = ["build_daemon", "install_signal_handlers", "round_executor"]

log = structlog.get_logger("unlearnd.daemon")


def round_executor(policy: str, name: str = "round") -> ThreadPoolExecutor:
    """The one thread rounds run on, at the CPU policy ``rounds.cpu_policy`` (its torch workers inherit it).

    A rebase trains on a second such thread (``name="rebase"``): background work at the same policy."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=_round_thread_init,
                              initargs=(policy,))


def _round_thread_init(policy: str) -> None:
    if policy != "normal" and not set_thread_policy(policy):
        log.warning("cpu_policy_unavailable", policy=policy, detail="this OS lacks it: rounds run at normal policy")


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT ask for a clean stop (contract §7): set ``stop``, which the daemon's loop watches."""
    def handler(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def build_daemon(config: Config, *, metrics: DaemonMetrics | None = None, stop: threading.Event | None = None,
                 consumer_factory: Callable[[], Any] | None = None, producer_factory: Callable[[], Any] | None = None
                 ) -> Daemon:
    """Open the ledger and the models (training a first version where allowed), and wire the daemon's parts.

    The Kafka clients are made later, by the factories (kafka-python's by default): nothing here reaches the
    broker. Raises :class:`~daemon.pipeline.runtime.RuntimeError_` when a model cannot be loaded.
    """
    if config.rounds.threads:
        torch.set_num_threads(config.rounds.threads)
    metrics = metrics or DaemonMetrics()
    registry_dir, mirror = open_registry(config)      # the working copy, and the bucket it is published to
    try:
        ledger = Ledger(config.state.ledger_target())       # SQLite in state.dir, or PostgreSQL at state.url
    except LedgerError as exc:
        raise RuntimeError_(str(exc)) from None
    try:                                            # issue 23: the state and id keys (made on first start)
        secrets = open_keys(config)
        plain = ledger.bind_id_key(secrets.ids.key_id)
    except (KeyFileError, IdKeyMismatch) as exc:
        ledger.close()
        raise RuntimeError_(str(exc)) from None
    if plain:
        log.warning("ledger_plain_digests", rows=plain, detail="rows written before schema 3 keep plain SHA-256 "
                    "digests of their ids and contents (they cannot be re-keyed); see docs/operations.md")
    runtimes: dict[str, ModelRuntime] = {}
    for section in config.models:
        rt = ModelRuntime.open(section, registry_dir, config.rounds, instances_of=ledger.instances_of, keys=secrets)
        pull_at_start(mirror, rt.name, ledger)      # an empty or older working copy starts from the bucket's LATEST
        rt.ensure_model()
        runtimes[rt.name] = rt
    k, r = config.kafka, config.rounds
    chain = ReceiptChain(k.instance_id, k.receipts_topic)
    batcher, offsets = Batcher(r.max_instances, r.max_wait_s), OffsetBook()
    intake = Intake(ledger, specs={n: rt.spec for n, rt in runtimes.items()},
                    predictors={n: rt.predict_at_intake for n, rt in runtimes.items()},
                    limits=Limits(max_instances=config.limits.max_instances,
                                  max_message_bytes=config.limits.max_message_bytes),
                    batcher=batcher, offsets=offsets, receipts=chain, dlq_topic=k.dlq_topic, metrics=metrics,
                    log_each=config.log.level.lower() == "debug",
                    versions=lambda m: runtimes[m].version if m in runtimes else None, id_key=secrets.ids)
    committer = RoundCommitter(ledger, registry_dir, chain, models_topic=k.models_topic,
                               method={"name": r.method, "preset": r.preset, "accumulation": r.accumulation,
                                       "memory_energy": r.memory_energy, "memory_copies": r.memory_copies},
                               split_failed=r.split_failed, keep_versions=config.registry.keep_versions,
                               mirror=mirror)
    outbox = OutboxPublisher(ledger, metrics, interval_s=config.daemon.outbox_interval_s,
                             producer_factory=producer_factory or kafka_producer_factory(k),
                             send_timeout_s=k.request_timeout_ms / 1000)
    rebaser = None
    if any(m.rebase.enabled() for m in config.models):
        rebaser = Rebaser(ledger, registry_dir, chain, models_topic=k.models_topic, owner=k.instance_id)
        rebaser.mirror = mirror
    return Daemon(config, metrics=metrics, ledger=ledger, runtimes=runtimes, intake=intake, committer=committer,
                  batcher=batcher, offsets=offsets, outbox=outbox,
                  consumer_factory=consumer_factory or (lambda: make_consumer(k)),
                  executor=round_executor(r.cpu_policy), stop=stop, rebaser=rebaser,
                  rebase_executor=round_executor(r.cpu_policy, "rebase") if rebaser else None)
