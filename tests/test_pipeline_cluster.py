"""The daemon among other processes: a broker that goes away and comes back, and a second daemon."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tests.pipeline_harness import (
    Broker,
    DaemonProcess,
    copy_registry,
    outcome_receipts,
    produce_requests,
    read_topic,
    request,
    write_config,
)

pytestmark = pytest.mark.slow


def _outbox_size(state_dir) -> int:
    db = sqlite3.connect(state_dir / "ledger.sqlite", timeout=10)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        db.close()


def test_broker_restart_delays_receipts_but_loses_none_and_the_daemon_reconnects(tmp_path, mnist_registry):
    broker = Broker().start()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=state)
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        d.wait_assigned()
        produce_requests(broker.bootstrap, [request("outage-a", "forget", ["mnist-train:400", "mnist-train:401"])])
        d.wait_for(lambda e: e.get("event") == "round_started", timeout=60)
        broker.stop()                                   # the round commits while the broker is away
        d.wait_for(lambda e: e.get("event") == "round_committed", timeout=120)
        time.sleep(1.0)
        assert _outbox_size(state) >= 2                 # the receipt and the model event wait in the outbox
        assert d.proc.poll() is None

        broker.start()                                  # same port; in-memory storage: a brand-new log
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=90,
                          until=lambda rs: "outage-a" in outcome_receipts(rs))
        assert [r["status"] for r in outcome_receipts(recs)["outage-a"]] == ["applied"]

        produce_requests(broker.bootstrap, [request("outage-b", "forget", ["mnist-train:402"])])
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=120,
                          until=lambda rs: "outage-b" in outcome_receipts(rs))
        got = outcome_receipts(recs)
        assert [r["status"] for r in got["outage-b"]] == ["applied"], d.tail()
        assert got["outage-b"][0]["model_version"] == got["outage-a"][0]["model_version"] + 1
        assert _outbox_size(state) == 0
        assert d.terminate() == 0                       # never restarted in between
    finally:
        d.kill()
        broker.stop()


def test_two_daemons_in_one_group_each_model_applied_by_exactly_one(tmp_path, mnist_registry):
    # mnist-b hashes to partition 0 and mnist-d to partition 2 (murmur2, 4 partitions): with the range
    # assignor, two members split them.
    broker = Broker().start()
    models = ("mnist-b", "mnist-d")
    reg = copy_registry(mnist_registry, tmp_path / "registry", names=models)
    daemons = []
    try:
        for n in (1, 2):
            cfg = write_config(tmp_path / f"u{n}.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                               state_dir=tmp_path / "state", models=models, instance=f"daemon-{n}")
            daemons.append(DaemonProcess(cfg, tmp_path / f"daemon{n}.log").start())
        for d in daemons:
            d.wait_assigned(timeout=90)
        time.sleep(4)                                   # let the group settle after the second join
        bodies = [request(f"{m}-{i}", "forget", [f"mnist-train:{500 + 10 * j + i}"], model=m)
                  for j, m in enumerate(models) for i in range(3)]
        produce_requests(broker.bootstrap, bodies)
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=240,
                          until=lambda rs: len(outcome_receipts(rs)) >= len(bodies))
        for d in daemons:
            assert d.terminate() == 0
    finally:
        for d in daemons:
            d.kill()
        broker.stop()
    got = outcome_receipts(recs)
    assert sorted(got) == sorted(b["request_id"] for b in bodies)
    owners = {}
    for m in models:
        rs = [got[f"{m}-{i}"][0] for i in range(3)]
        assert all(r["status"] == "applied" and r["model"] == m for r in rs)
        owners[m] = {r["daemon"] for r in rs}
        assert len(owners[m]) == 1, owners             # one model, one daemon
    assert owners["mnist-b"] != owners["mnist-d"], owners   # and the partitions were shared out
