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
