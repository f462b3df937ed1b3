"""A takeover during a ledger outage (issue 24): the daemon's rebalance finds the PostgreSQL ledger away.

In-process daemons with stand-in Kafka clients (as in tests/test_takeover.py), a real MNIST model and round, and a
real PostgreSQL server of their own that the tests stop and start. SQLite is a local file that is never "away":
the deferral is a PostgreSQL case; the test of an error that is not the ledger's runs on both engines.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from kafka import TopicPartition
from structlog.testing import capture_logs

from daemon import registry
from daemon.pipeline.assembly import build_daemon
from daemon.pipeline.config import load_config
from daemon.pipeline.intake import fingerprint
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.owners import partition_of
from tests.pg_harness import PostgresServer
from tests.pipeline_harness import copy_registry, request
from tests.test_pipeline_daemon import Record, _Consumer, _Producer, _until

MODEL = "mnist-cnn"
TP = TopicPartition("unlearn.requests", partition_of(MODEL, 4))


class _Partition(_Consumer):
    """One partition of a 4-partition topic; ``seek`` hands its records out again from that offset."""

    def __init__(self, records: list[Record]) -> None:
        super().__init__(list(records))
        self.records, self.seeks = list(records), []

    def poll(self, timeout_ms: int) -> dict:
        got = super().poll(timeout_ms)
        return {TP: got[k] for k in got} if got else got

    def assignment(self) -> set:
        return {TP}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2, 3}

    def committed(self, tp, timeout_ms=None):  # noqa: ANN001, ANN201 - nothing committed yet
        return 0

    def seek(self, tp, offset: int) -> None:  # noqa: ANN001
        self.seeks.append((tp, offset))
        self.queue = [r for r in self.records if r.offset >= offset]


def _daemon(tmp_path: Path, reg: Path, env: dict[str, str], records: list[Record]):  # noqa: ANN202
    config = load_config(None, env={"UNLEARND_REGISTRY_DIR": str(reg), "UNLEARND_STATE_DIR": str(tmp_path / "state"),
                                    "UNLEARND_KAFKA_CREATE_TOPICS": "false", "UNLEARND_METRICS_PORT": "0",
                                    "UNLEARND_ROUNDS_MAX_WAIT_S": "0", "UNLEARND_ROUNDS_THREADS": "1",
                                    "UNLEARND_ROUNDS_RETENTION_MAX_DROP": "0.5",
                                    "UNLEARND_MODELS_0_PROBE": "mnist-test:0-199", **env})
    consumer, producer, stop = _Partition(records), _Producer(), threading.Event()
    daemon = build_daemon(config, stop=stop, consumer_factory=lambda: consumer, producer_factory=lambda: producer)
    daemon.start()
    return daemon, consumer, producer, stop


def _unavailable(daemon) -> float:  # noqa: ANN001
    return daemon.metrics.registry.get_sample_value("unlearnd_ledger_unavailable_total") or 0.0


@pytest.fixture()
def server():
    s = PostgresServer().start()            # its own server: these tests stop it
    yield s
    s.stop()


@pytest.mark.postgres
def test_a_takeover_that_finds_the_ledger_away_is_retried_and_no_round_runs_before_it(
        tmp_path, mnist_registry, server, monkeypatch):
    """Another host owned the model and died with a round running. This daemon is assigned the partition while the
    database is down: the takeover is deferred (logged, counted) and the model held. The database comes back and
    the intake accepts the request before the takeover's next try: no round of it runs. Then the main loop takes
    the model (epoch 2), abandons the dead host's round, reads the partition again, and applies the request once,
    under the new epoch."""
    url = server.new_database()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    record = Record(TP.topic, TP.partition, 0, MODEL.encode(),
                    json.dumps(request("a", refs=["mnist-train:7"])).encode(), 1)
    daemon, consumer, producer, stop = _daemon(tmp_path, reg, {"UNLEARND_STATE_URL": url}, [record])
    other = Ledger(url)
    try:
        assert other.take_ownership(MODEL, "host-1") == 1       # the previous owner: read "a", began a round, died
        with other.transaction() as tx:
            tx.accept("a", MODEL, "forget", 1, 10.0)
            tx.record_delivery(TP.topic, TP.partition, 0, fingerprint(record), "a", "accepted")
        dead_round = other.allocate_round(MODEL, "host-1", ["a"])
        server._shutdown()
        with capture_logs() as logs:
            daemon.on_assigned({TP})                            # no raise: deferred
            assert MODEL in daemon.rebalance.deferred and MODEL in daemon.batcher.held
            assert daemon.owners.epoch(MODEL) is None and _unavailable(daemon) == 1
            gate, retry = threading.Event(), daemon.rebalance.retry_deferred
            gate.set()
            monkeypatch.setattr(daemon.rebalance, "retry_deferred", lambda: gate.is_set() and retry())
            result: list[int] = []
            loop = threading.Thread(target=lambda: result.append(daemon.run()))
            loop.start()
            try:
                _until(lambda: sum(e["event"] == "takeover_deferred" for e in logs) >= 3, timeout=30)  # 0.5 s, 1 s
                assert not [e for e in logs if e["event"] == "round_started"]
                gate.clear()                    # the takeover's retries pause, so the intake gets the request first
                time.sleep(0.5)                 # (a retry under way fails at once: the database is still down)
                server._launch()
                _until(lambda: daemon.batcher.is_waiting("a"), timeout=30)
                time.sleep(1.0)
                assert not [e for e in logs if e["event"] == "round_started"]     # held: the request waits
                gate.set()
                _until(lambda: any(t == "unlearn.receipts" for t, _ in producer.sent), timeout=120)
            finally:
                stop.set()
                loop.join(timeout=60)
        assert result == [0]
        events = [e["event"] for e in logs]
        deferred = [e for e in logs if e["event"] == "takeover_deferred"]
        assert {e["model"] for e in deferred} == {MODEL}
        assert [e["retry_s"] for e in deferred[:3]] == [0.5, 1.0, 2.0]          # the intake's backoff
        resumed = [e for e in logs if e["event"] == "takeover_resumed"]
        assert [(e["model"], e["epoch"], e["rounds_resolved"]) for e in resumed] == [(MODEL, 2, 1)]
        assert events.index("takeover_resumed") < events.index("round_started")
        assert _unavailable(daemon) >= len(deferred)
        assert daemon.owners.epoch(MODEL) == 2 and not daemon.rebalance.deferred
        assert MODEL not in daemon.batcher.held
        assert (TP, 0) in consumer.seeks                        # read again after the takeover
        assert other.round_state(dead_round) == "abandoned"
        receipts = [json.loads(v) for t, v in producer.sent if t == "unlearn.receipts"]
        assert [(r["request_id"], r["status"], r["model_version"]) for r in receipts] == [("a", "applied", 2)]
        assert registry.read_manifest(reg, MODEL, 2)["owner_epoch"] == 2
    finally:
        other.close()
        daemon.shutdown()


@pytest.mark.postgres
def test_a_deferred_takeover_is_given_up_when_the_partition_is_revoked_again(tmp_path, mnist_registry, server):
    """The partition goes elsewhere while the takeover waits: it is not tried again (it would take the model from
    its new owner), and the model is no longer held here."""
    url = server.new_database()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    daemon, _consumer, _producer, _stop = _daemon(tmp_path, reg, {"UNLEARND_STATE_URL": url}, [])
    other = Ledger(url)
    try:
        assert other.take_ownership(MODEL, "host-1") == 1
        server._shutdown()
        with capture_logs() as logs:
            daemon.on_assigned({TP})
            assert MODEL in daemon.rebalance.deferred
            daemon.on_revoked({TP})
            daemon.rebalance.retry_deferred()                   # a rebalance under way: nothing is tried
            assert [e["event"] for e in logs].count("takeover_deferred") == 1
            daemon.on_assigned(set())                           # the partition went to another daemon
        assert not daemon.rebalance.deferred and MODEL not in daemon.batcher.held
        server._launch()
        daemon.rebalance._next_try = 0.0
        daemon.rebalance.retry_deferred()
        assert other.ownership_epoch(MODEL) == 1 and daemon.owners.epoch(MODEL) is None
    finally:
        other.close()
        daemon.shutdown()


@pytest.mark.postgres
@pytest.mark.parametrize("taken_meanwhile", [False, True])
def test_a_takeover_cut_after_its_epoch_was_taken_resumes_under_that_epoch(tmp_path, mnist_registry, server,
                                                                           monkeypatch, taken_meanwhile):
    """The database goes away between the take (epoch 2 recorded) and the resolution of the previous owner's
    rounds: the retry resolves them under epoch 2, without taking the model a second time (which would find it
    "still ours" and resolve nothing). Had another daemon taken the model meanwhile (epoch 3), the retry takes it
    anew (epoch 4) instead of resolving under an epoch that is no longer the model's."""
    url = server.new_database()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    daemon, _consumer, _producer, _stop = _daemon(tmp_path, reg, {"UNLEARND_STATE_URL": url}, [])
    other = Ledger(url)
    try:
        assert other.take_ownership(MODEL, "host-1") == 1
        dead_round = other.allocate_round(MODEL, "host-1", ["a"])
        take = daemon.owners.take

        def take_then_lose_the_database(model: str) -> int | None:
            epoch = take(model)
            server._shutdown()
            return epoch

        monkeypatch.setattr(daemon.owners, "take", take_then_lose_the_database)
        with capture_logs() as logs:
            daemon.on_assigned({TP})
            assert daemon.rebalance.deferred[MODEL].epoch == 2 and MODEL in daemon.batcher.held
            monkeypatch.undo()
            server._launch()
            if taken_meanwhile:
                assert other.take_ownership(MODEL, "host-3") == 3
            daemon.rebalance._next_try = 0.0
            daemon.rebalance.retry_deferred()
        final = 4 if taken_meanwhile else 2
        resumed = [(e["model"], e["epoch"], e["rounds_resolved"]) for e in logs if e["event"] == "takeover_resumed"]
        assert resumed == [(MODEL, final, 1)] and other.ownership_epoch(MODEL) == daemon.owners.epoch(MODEL) == final
        assert other.round_state(dead_round) == "abandoned"
        assert not daemon.rebalance.deferred and MODEL not in daemon.batcher.held
    finally:
        other.close()
        daemon.shutdown()


def test_an_error_other_than_the_ledgers_during_a_takeover_is_logged_and_not_retried(
        tmp_path, mnist_registry, ledger_db, monkeypatch):
    """Only an unreachable ledger defers a takeover: any other error is what it was before (logged by the rebalance
    listener as assign_handling_failed, nothing retried), on both engines."""
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    daemon, _consumer, _producer, _stop = _daemon(tmp_path, reg, ledger_db.daemon_env(), [])
    try:
        def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a registry that cannot be read, say
            raise OSError("registry unreadable")

        monkeypatch.setattr(daemon.committer, "take_over", broken)
        with capture_logs() as logs:
            daemon.rebalance.on_partitions_assigned({TP})
        failed = [e for e in logs if e["event"] == "assign_handling_failed"]
        assert len(failed) == 1 and "registry unreadable" in failed[0]["error"]
        assert not daemon.rebalance.deferred and _unavailable(daemon) == 0
        assert not [e for e in logs if e["event"] == "takeover_deferred"]
    finally:
        daemon.shutdown()
