"""Issue 23, item 1: an accepted request whose round died with the daemon and whose message died with the broker
is found, counted while it waits, answered with a failed receipt that asks for a resubmission, and the
resubmission is applied exactly once (daemon/pipeline/stranded.py)."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import registry
from daemon.pipeline.ledger import Ledger
from tests.pipeline_harness import (
    DaemonProcess,
    copy_registry,
    free_port,
    outcome_receipts,
    produce_requests,
    read_topic,
    receipts_by_request,
    request,
    write_config,
)


def _gauges(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


@pytest.mark.slow
def test_a_round_lost_with_the_daemon_and_its_messages_lost_with_the_broker_is_failed_then_resubmitted(
        tmp_path, broker, mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    port = free_port()
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                       state_dir=tmp_path / "state", metrics_port=port, rounds="max_instances = 2",
                       extra="stranded_after_s = 4")
    ids = ["strand-1", "strand-2"]
    bodies = [request(rid, "forget", [f"mnist-train:{400 + i}"]) for i, rid in enumerate(ids)]
    produce_requests(broker.bootstrap, bodies)

    # 1. the daemon dies inside the round (its intent recorded, no version written): the round is lost
    d = DaemonProcess(cfg, tmp_path / "d1.log", env={"UNLEARND_FAILPOINTS": "after_begin_commit"}).start()
    try:
        assert d.wait(timeout=180) != 0, d.tail()
    finally:
        d.kill()
    # 2. the in-memory broker restarts empty: the messages, the topics and the committed offsets are gone
    broker.stop()
    broker.start()

    d = DaemonProcess(cfg, tmp_path / "d2.log").start()
    try:
        d.wait_for(lambda e: e.get("event") == "round_abandoned", timeout=60)
        # 3. while they wait, the pending gauge and the deletion clock count them
        seen: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and seen.get("unlearnd_pending_requests", 0) < 2:
            seen = _gauges(port)
            time.sleep(0.2)
        assert seen.get("unlearnd_pending_requests") == 2, (seen, d.tail())
        assert seen["unlearnd_oldest_pending_age_seconds"] > 0
        # 4. then each gets a failed receipt that asks for a resubmission
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=60,
                          until=lambda rs: all(r in outcome_receipts(rs) for r in ids))
        failed = outcome_receipts(recs)
        for rid in ids:
            [r] = failed[rid]
            assert r["status"] == "failed" and r["resubmit"] is True, r
            assert r["reason"].startswith("stranded:") and "resubmit" in r["reason"], r["reason"]
            assert r["round_id"] == "r-000001"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _gauges(port).get("unlearnd_pending_requests") != 0:
            time.sleep(0.2)
        assert _gauges(port)["unlearnd_pending_requests"] == 0

        # 5. the resubmission is accepted (not a duplicate) and applied, once; a replay of it is a duplicate
        produce_requests(broker.bootstrap, bodies)
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=180,
                          until=lambda rs: all(len(outcome_receipts(rs).get(r, [])) == 2 for r in ids))
        produce_requests(broker.bootstrap, bodies[:1])
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=60,
                          until=lambda rs: any(x["status"] == "duplicate"
                                               for x in receipts_by_request(rs).get(ids[0], [])))
        assert d.terminate() == 0
    finally:
        d.kill()
    outcomes = outcome_receipts(recs)
    for rid in ids:
        assert [r["status"] for r in outcomes[rid]] == ["failed", "applied"], outcomes[rid]
    [dup] = [x for x in receipts_by_request(recs)[ids[0]] if x["status"] == "duplicate"]
    assert dup["original"]["status"] == "applied"
    applied = [rid for v in registry.list_versions(reg, "mnist-cnn")
               for rid in registry.read_manifest(reg, "mnist-cnn", v)["request_ids"]]
    assert sorted(applied) == sorted(ids), "applied exactly once each"
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    try:
        assert ledger.accepted_requests() == []
        assert {ledger.request(rid)["status"] for rid in ids} == {"applied"}
        assert ledger.verify_audit()[1] is None
    finally:
        ledger.close()


# -- the watch on its own: a real ledger, the consumer's view given -------------------------------------------
def _watch(target: str, after_s: float = 0.0):
    from daemon.pipeline.receipts import ReceiptChain
    from daemon.pipeline.stranded import StrandedWatch

    ledger = Ledger(target)
    with ledger.transaction() as tx:
        for i, rid in enumerate(("o-0", "o-1", "o-2")):
            tx.accept(rid, "m", "forget", 1, 100.0 + i)
            tx.record_delivery("req", 0, i, f"fp{i}", rid, "accepted")
    return ledger, StrandedWatch(ledger, ReceiptChain("d1", "receipts"), after_s=after_s, versions=lambda _m: 3)


def _view(assigned=(0,), next_offset=None, quiet=False, position=0, partitions=(0,)):
    from kafka import TopicPartition

    from daemon.pipeline.stranded import PartitionView

    return PartitionView(assigned=frozenset(TopicPartition("req", p) for p in assigned),
                         next_offset={TopicPartition("req", p): o for p, o in (next_offset or {}).items()},
                         quiet=quiet, position=lambda _tp: position, partitions=lambda _t: set(partitions))


def test_orphans_are_counted_on_owned_partitions_and_failed_only_on_evidence(ledger_db):
    import json as _json

    from kafka import TopicPartition

    ledger, watch = _watch(ledger_db.target())
    assert watch.step({"o-0", "o-1", "o-2"}, _view()) == []          # all held: no orphan
    assert watch.step({"o-0"}, _view(position=0)) == []               # o-1, o-2 orphaned, the log not yet read
    assert {o.request_id for o in watch.counted({TopicPartition("req", 0)})} == {"o-1", "o-2"}
    assert watch.counted({TopicPartition("req", 1)}) == []            # another daemon's partition
    assert watch.step({"o-0"}, _view(assigned=(1,), quiet=True, partitions=(0, 1))) == []   # not ours: no evidence
    failed = watch.step({"o-0"}, _view(next_offset={0: 2}))          # read past offset 1, not offset 2
    assert [r.request_id for r in failed] == ["o-1"]
    failed = watch.step({"o-0"}, _view(quiet=True, position=2))       # the log ends at 2: offset 2 is gone
    assert [r.request_id for r in failed] == ["o-2"]
    assert ledger.request("o-1")["status"] == "stranded" and ledger.request("o-0")["status"] == "accepted"
    receipts = [_json.loads(r.value) for r in ledger.outbox()]
    assert [(r["request_id"], r["status"], r["resubmit"], r["model_version"]) for r in receipts] == [
        ("o-1", "failed", True, 3), ("o-2", "failed", True, 3)]
    assert "passed" in receipts[0]["reason"] and "log_ends" in receipts[1]["reason"]
    assert watch.step(set(), _view(partitions=(1, 2))) != []          # the topic lost partition 0
    assert ledger.accepted_requests() == []


def test_evidence_must_hold_for_the_wait_and_a_message_taken_in_again_clears_it(ledger_db):
    ledger, watch = _watch(ledger_db.target(), after_s=0.3)
    assert watch.step({"o-1", "o-2"}, _view(quiet=True, position=0)) == []    # o-0: evidence, the wait starts
    time.sleep(0.35)
    assert watch.step({"o-0", "o-1", "o-2"}, _view(quiet=True)) == []        # taken in again (redelivered)
    assert watch.orphans == {}
    assert watch.step({"o-1", "o-2"}, _view(quiet=True)) == []               # orphaned again: a new wait
    with ledger.transaction() as tx:                                         # another message at offset 0
        tx.record_delivery("req", 0, 0, "other", "x-9", "duplicate")
    time.sleep(0.35)
    [r] = watch.step({"o-1", "o-2"}, _view())
    assert r.request_id == "o-0" and r.evidence.startswith("overwritten")
