"""Ownership wired into the round commit, and the takeover of a model (issue 24, part 3), on both ledger engines.

Two "hosts" here are two Ledger connections to one database and two runtimes of one model on one shared registry
directory; each daemon's round runs for real (the MNIST test model). Another daemon takes the model over at each
step of a round's commit, and the tests check the stale owner's refusal, the successor's resolution, and that
every request ends with exactly one applied receipt and no version is published twice.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from kafka.partitioner.default import DefaultPartitioner

from daemon import registry
from daemon.pipeline import commit as commit_module
from daemon.pipeline.commit import RoundCommitter
from daemon.pipeline.config import ModelSection, RoundsSection
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.owners import Owners, partition_of
from daemon.pipeline.receipts import ReceiptChain
from daemon.pipeline.runtime import ModelRuntime
from tests.pipeline_harness import copy_registry, pending_request, request

MODEL = "mnist-cnn"


@pytest.fixture()
def reg(tmp_path, mnist_registry):
    return copy_registry(mnist_registry, tmp_path / "registry")


def _runtime(reg) -> ModelRuntime:
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-199"), reg,
                           RoundsSection(retention_max_drop=0.5))
    rt.ensure_model()
    return rt


def _host(ledger_db, reg, name: str) -> tuple[Ledger, ModelRuntime, RoundCommitter]:
    ledger = Ledger(ledger_db.target())
    committer = RoundCommitter(ledger, reg, ReceiptChain(name, "receipts"), models_topic="models",
                               method={"name": "adv_imp", "preset": "default"}, split_failed=False, keep_versions=0)
    return ledger, _runtime(reg), committer


def _accept(ledger: Ledger, *ids: str) -> None:
    with ledger.transaction() as tx:
        for rid in ids:
            tx.accept(rid, MODEL, "forget", 1, 10.0)


def _applied_receipts(ledger: Ledger) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in ledger.outbox():
        if row.topic == "receipts":
            r = json.loads(row.value)
            out.setdefault(r["request_id"], []).append(r)
    return out


def _on_failpoint(monkeypatch, point: str, action) -> None:
    """Run ``action`` when the round commit reaches ``point`` (another host acting at that instant)."""
    def hook(name: str) -> None:
        if name == point:
            action()
    monkeypatch.setattr(commit_module, "failpoint", hook)


@pytest.mark.parametrize("when", ["before_begin_commit", "after_begin_commit", "after_registry_write"])
def test_a_model_taken_over_mid_commit_is_applied_once_by_its_successor_with_no_duplicate_version(
        ledger_db, reg, monkeypatch, when):
    """A takes the model and runs a round; B takes the model over (i) before A's round records its intent, (ii)
    after that but before A's version is published (A writes it, then is refused before LATEST moves), (iii) after
    LATEST moved but before A's ledger commit. A's round ends ``stale`` each time and A decides nothing; B's
    takeover resolves A's round (abandoned, or rolled forward when its version is complete) and B applies the
    rest: every request one applied receipt, each version published once, LATEST's manifest carrying the epoch
    of the daemon that published it."""
    la, rt_a, ca = _host(ledger_db, reg, "d1")
    lb, rt_b, cb = _host(ledger_db, reg, "d2")
    try:
        _accept(la, "a", "b")
        epoch_a = la.take_ownership(MODEL, "d1")
        taken: list[int] = []

        def take_over() -> None:
            taken.append(lb.take_ownership(MODEL, "d2"))

        if when == "before_begin_commit":
            take_over()
        else:
            _on_failpoint(monkeypatch, when, take_over)
        batch = [pending_request(rt_a, request("a", refs=["mnist-train:7"]))]
        round_a = la.allocate_round(MODEL, "d1", ["a"])
        outcome = ca.run(rt_a, batch, round_a, should_abort=lambda: False, epoch=epoch_a)
        monkeypatch.setattr(commit_module, "failpoint", lambda name: None)
        assert outcome.status == "stale" and taken == [epoch_a + 1]
        assert la.request("a")["status"] == "accepted"          # A decided nothing
        version_written = when != "before_begin_commit"
        latest_moved = when == "after_registry_write"
        assert registry.latest_version(reg, MODEL) == (2 if latest_moved else 1)
        assert la.round_state(round_a) == ("committing" if version_written else "abandoned")

        resolved = cb.take_over(MODEL, "d2", rt_b, taken[0])
        assert resolved == (1 if version_written else 0)
        if version_written:                                     # A's complete version is rolled forward by B
            assert la.round_state(round_a) == "committed" and lb.request("a")["status"] == "applied"
            assert registry.latest_version(reg, MODEL) == 2 and rt_b.version == 2
        else:                                                   # Kafka re-delivers "a" to B, which applies it
            assert rt_b.version == 1
        todo = ["b"] if version_written else ["a", "b"]
        batch_b = [pending_request(rt_b, request(r, refs=[f"mnist-train:{20 + i}"]), offset=i)
                   for i, r in enumerate(todo)]
        round_b = lb.allocate_round(MODEL, "d2", todo)
        done = cb.run(rt_b, batch_b, round_b, should_abort=lambda: False, epoch=taken[0])
        assert done.status == "applied"
        expected = 3 if version_written else 2
        assert done.version.version == expected == registry.latest_version(reg, MODEL)
        assert registry.read_manifest(reg, MODEL, expected)["owner_epoch"] == taken[0]
        assert registry.read_manifest(reg, MODEL, expected)["parent"] == expected - 1

        receipts = _applied_receipts(lb)
        assert sorted(receipts) == ["a", "b"] and all(len(v) == 1 for v in receipts.values())
        assert all(v[0]["status"] == "applied" for v in receipts.values())
        published = [registry.read_manifest(reg, MODEL, v)["round_id"] for v in registry.list_versions(reg, MODEL)]
        assert len(published) == len(set(published))          # no round published twice
        assert lb.verify_audit() == (2, None)
    finally:
        la.close()
        lb.close()


def test_a_takeover_loads_latest_with_its_continual_state_and_leaves_its_own_running_round_alone(ledger_db, reg):
    """B's runtime was loaded at version 1; A publishes version 2 under its epoch. B's takeover loads version 2, with
    the continual state A's round left in it (the session's memory), and does not touch a round B itself runs."""
    la, rt_a, ca = _host(ledger_db, reg, "d1")
    lb, rt_b, cb = _host(ledger_db, reg, "d2")
    try:
        _accept(la, "a")
        epoch_a = la.take_ownership(MODEL, "d1")
        round_a = la.allocate_round(MODEL, "d1", ["a"])
        assert ca.run(rt_a, [pending_request(rt_a, request("a", refs=["mnist-train:7"]))], round_a,
                      should_abort=lambda: False, epoch=epoch_a).status == "applied"
        assert registry.read_manifest(reg, MODEL, 2)["owner_epoch"] == epoch_a
        assert rt_b.version == 1
        own = lb.allocate_round(MODEL, "d2", ["x"])
        assert cb.take_over(MODEL, "d2", rt_b, lb.take_ownership(MODEL, "d2")) == 0
        assert lb.round_state(own) == "running"
        assert rt_b.version == 2 and rt_b.live.info.sha256 == rt_a.live.info.sha256
        assert rt_b.live.session.memory.fill() == rt_a.live.session.memory.fill()
        assert rt_b.deletions_since_base == rt_a.deletions_since_base == 1
    finally:
        la.close()
        lb.close()


class _Cluster:
    """The topic metadata kafka-python's producer hands its partitioner: topic "t" with ``n`` partitions."""

    def __init__(self, n: int) -> None:
        self.n = n

    def topics(self) -> set[str]:
        return {"t"}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.n))

    available_partitions_for_topic = partitions_for_topic


def test_owners_take_models_of_their_partitions_keep_an_untouched_epoch_and_retake_after_a_drop(ledger_db):
    """The daemon's side: partition_of is Kafka's default partitioner; a re-assignment of a partition nobody took
    in between keeps the epoch (in-flight rounds stay valid); a model another daemon took, or one dropped after a
    refusal, is taken again with a higher epoch."""
    models = ["mnist-b", "mnist-d", "mnist-e", "mnist-cnn"]
    for m in models:
        for n in (1, 3, 4, 12):
            assert partition_of(m, n) == DefaultPartitioner().partition("t", m, m.encode(), None, None, _Cluster(n))
    la, lb = Ledger(ledger_db.target()), Ledger(ledger_db.target())
    try:
        a, b = Owners(la, "d1", models), Owners(lb, "d2", models)
        assert a.models_of([0], 4) == ["mnist-b"] and a.models_of([2], 4) == ["mnist-d", "mnist-cnn"]
        assert a.on_assigned([0, 1, 2, 3], 4) == [(m, 1) for m in models]
        assert a.on_assigned([0, 1, 2, 3], 4) == []                    # an ordinary rebalance: epochs kept
        assert b.on_assigned([2, 3], 4) == [("mnist-d", 2), ("mnist-e", 2), ("mnist-cnn", 2)]
        assert a.on_assigned([0, 1], 4) == [] and a.epoch("mnist-b") == 1
        assert a.on_assigned([2], 4) == [("mnist-d", 3), ("mnist-cnn", 3)]   # taken back from B
        b.drop("mnist-e")
        assert b.epoch("mnist-e") is None and "mnist-e" in b.dropped
        assert b.on_assigned([3], 4) == [("mnist-e", 3)] and "mnist-e" not in b.dropped
        with pytest.raises(ValueError):
            partition_of("m", 0)
    finally:
        la.close()
        lb.close()


@pytest.mark.slow
def test_a_daemon_whose_model_was_taken_over_drops_it_counts_the_refusal_and_applies_it_once_when_reassigned(
        tmp_path, mnist_registry):
    """The daemon's side of a refusal (stand-in Kafka clients, a real SQLite ledger, model and round): another
    "host" takes the model after this daemon took it; the daemon's round ends stale, is counted in
    unlearnd_stale_owner_refusals_total, sends no receipt and commits no offset, and no round of the model runs
    while it is dropped; assigned the partition again, it takes the model back and applies the request once."""
    import threading
    import time as _time

    from kafka import TopicPartition

    from daemon.pipeline.config import load_config
    from daemon.pipeline.assembly import build_daemon
    from tests.test_pipeline_daemon import Record, _Consumer, _Producer, _until

    tp = TopicPartition("unlearn.requests", partition_of(MODEL, 4))

    class Consumer(_Consumer):
        def poll(self, timeout_ms: int) -> dict:
            got = super().poll(timeout_ms)
            return {tp: got[k] for k in got} if got else got

        def assignment(self) -> set:
            return {tp}

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1, 2, 3}

        def committed(self, tp, timeout_ms=None):  # noqa: ANN001, ANN201 - nothing committed past the request
            return 0

        def seek(self, tp, offset: int) -> None:  # noqa: ANN001 - the broker hands the partition out again from there
            self.queue = [r for r in records if r.offset >= offset]

    reg = copy_registry(mnist_registry, tmp_path / "registry")
    state = tmp_path / "state"
    config = load_config(None, env={"UNLEARND_REGISTRY_DIR": str(reg), "UNLEARND_STATE_DIR": str(state),
                                    "UNLEARND_KAFKA_CREATE_TOPICS": "false", "UNLEARND_METRICS_PORT": "0",
                                    "UNLEARND_ROUNDS_MAX_WAIT_S": "0", "UNLEARND_ROUNDS_THREADS": "1",
                                    "UNLEARND_ROUNDS_RETENTION_MAX_DROP": "0.5",
                                    "UNLEARND_MODELS_0_PROBE": "mnist-test:0-199"})
    body = json.dumps(request("a", refs=["mnist-train:7"])).encode()
    records = [Record(tp.topic, tp.partition, 0, MODEL.encode(), body, 1)]
    consumer = Consumer(list(records))
    producer, stop = _Producer(), threading.Event()
    daemon = build_daemon(config, stop=stop, consumer_factory=lambda: consumer, producer_factory=lambda: producer)
    daemon.start()
    daemon.on_assigned({tp})
    other = Ledger(state / "ledger.sqlite")
    try:
        assert daemon.owners.epoch(MODEL) == 1
        assert other.take_ownership(MODEL, "another-host") == 2      # taken over before the round commits
        result: list[int] = []
        loop = threading.Thread(target=lambda: result.append(daemon.run()))
        loop.start()
        try:
            _until(lambda: daemon.metrics.registry.get_sample_value(
                "unlearnd_stale_owner_refusals_total", {"model": MODEL}) == 1)
            _time.sleep(1.0)                                        # nothing more runs while the model is dropped
            assert daemon.owners.epoch(MODEL) is None and MODEL in daemon.owners.dropped
            assert other.request("a")["status"] == "accepted"
            assert all(c[tp] == 0 for c in consumer.commits)       # never past the refused round's message
            assert not [t for t, _ in producer.sent if t == "unlearn.receipts"]
            assert registry.latest_version(reg, MODEL) == 1
            assert other.rounds_in_state("abandoned", model=MODEL)[0]["owner"] == daemon.instance
            daemon.on_revoked({tp})         # a rebalance gives the partition back (called from a poll in
            daemon.on_assigned({tp})        # production; here between two): it is read again from offset 0
            _until(lambda: any(t == "unlearn.receipts" for t, _ in producer.sent))
            _until(lambda: consumer.commits and consumer.commits[-1] == {tp: 1})
        finally:
            stop.set()
            loop.join(timeout=60)
        assert result == [0] and daemon.owners.epoch(MODEL) == 3
        receipts = [json.loads(v) for t, v in producer.sent if t == "unlearn.receipts"]
        assert [(r["request_id"], r["status"], r["model_version"]) for r in receipts] == [("a", "applied", 2)]
        assert registry.read_manifest(reg, MODEL, 2)["owner_epoch"] == 3
    finally:
        other.close()


def test_a_rebalance_keeps_the_requests_of_a_partition_assigned_again_and_rewinds_one_whose_model_was_taken(
        tmp_path, mnist_registry):
    """kafka-python keeps the read position of a partition assigned again, so its waiting requests must stay queued
    (they would never be read again); one that went elsewhere is dropped; and a kept partition whose model another
    daemon took in between is rewound to the group's committed offset (the ledger decides its requests again)."""
    from kafka import TopicPartition

    from daemon.pipeline.config import load_config
    from daemon.pipeline.assembly import build_daemon
    from tests.test_pipeline_daemon import _Consumer, _Producer

    mine, other_tp = TopicPartition("unlearn.requests", partition_of(MODEL, 4)), TopicPartition("unlearn.requests", 0)

    class Consumer(_Consumer):
        seeks: list = []

        def assignment(self) -> set:
            return {mine, other_tp}

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0, 1, 2, 3}

        def committed(self, tp, timeout_ms=None):  # noqa: ANN001, ANN201 - the group's offset, as the broker says
            return 5

        def seek(self, tp, offset: int) -> None:  # noqa: ANN001
            self.seeks.append((tp, offset))

    reg = copy_registry(mnist_registry, tmp_path / "registry")
    state = tmp_path / "state"
    config = load_config(None, env={"UNLEARND_REGISTRY_DIR": str(reg), "UNLEARND_STATE_DIR": str(state),
                                    "UNLEARND_KAFKA_CREATE_TOPICS": "false", "UNLEARND_METRICS_PORT": "0",
                                    "UNLEARND_MODELS_0_PROBE": "mnist-test:0-199"})
    consumer = Consumer([])
    daemon = build_daemon(config, consumer_factory=lambda: consumer, producer_factory=_Producer)
    daemon.start()
    other = Ledger(state / "ledger.sqlite")
    try:
        daemon.on_assigned({mine, other_tp})
        waiting = [pending_request(daemon.runtimes[MODEL], request(r, refs=["mnist-train:7"]), offset=o)
                   for r, o in (("a", 5), ("b", 3))]
        waiting = [dataclasses.replace(waiting[0], topic=mine.topic, partition=mine.partition),
                   dataclasses.replace(waiting[1], topic=other_tp.topic, partition=other_tp.partition)]
        for p in waiting:
            daemon.batcher.add(p, 0.0)
        daemon.on_revoked({mine, other_tp})
        daemon.on_assigned({mine})                          # partition 0 went elsewhere; ours came back
        assert [p.request_id for p in daemon.batcher.waiting()] == ["a"] and consumer.seeks == []
        assert daemon.owners.epoch(MODEL) == 1              # nobody took the model: its epoch is kept
        other.take_ownership(MODEL, "another-host")
        daemon.on_revoked({mine})
        daemon.on_assigned({mine})                          # taken back: read again from the group's offset
        assert daemon.owners.epoch(MODEL) == 3 and consumer.seeks == [(mine, 5)]
        assert list(daemon.batcher.waiting()) == []
    finally:
        other.close()
        daemon.shutdown()
