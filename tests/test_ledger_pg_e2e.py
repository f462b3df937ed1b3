"""A daemon end to end with its ledger on PostgreSQL (issue 24): `unlearnd run` against a real Tansu broker and a
real PostgreSQL server, nothing in state.dir but the keys; the receipts, the idempotency of a replayed message and
of a restart, and `unlearnd audit verify` reading the same database."""

from __future__ import annotations

import pytest

from daemon import registry
from daemon.cli import main
from daemon.pipeline.ledger import Ledger
from tests.pipeline_harness import (
    DaemonProcess,
    copy_registry,
    outcome_receipts,
    produce_requests,
    read_topic,
    receipts_by_request,
    request,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_a_daemon_on_a_postgresql_ledger_applies_each_request_once_and_its_audit_trail_verifies(
        tmp_path, broker, mnist_registry, postgres, monkeypatch, capsys):
    url = postgres.new_database()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=state,
                       rounds="max_instances = 2")
    ids = ["pg-1", "pg-2", "pg-3"]
    bodies = [request(rid, "forget", [f"mnist-train:{400 + i}"]) for i, rid in enumerate(ids)]
    produce_requests(broker.bootstrap, [*bodies, bodies[0]])            # pg-1 twice: one duplicate receipt
    env = {"UNLEARND_STATE_URL": url}

    d = DaemonProcess(cfg, tmp_path / "daemon.log", env=env).start()
    try:
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=240,
                          until=lambda rs: all(r in outcome_receipts(rs) for r in ids)
                          and any(x["status"] == "duplicate" for x in receipts_by_request(rs).get("pg-1", [])))
        assert d.terminate() == 0, d.tail()
    finally:
        d.kill()
    # a restart on the same database: every message is known, nothing is decided or applied again
    d = DaemonProcess(cfg, tmp_path / "daemon2.log", env=env).start()
    try:
        d.wait_for(lambda e: e.get("event") == "daemon_started", timeout=90)
        assert d.terminate() == 0, d.tail()
    finally:
        d.kill()

    recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=5)
    outcomes = outcome_receipts(recs)
    assert {rid: [r["status"] for r in outcomes[rid]] for rid in ids} == {rid: ["applied"] for rid in ids}
    assert [r["status"] for r in receipts_by_request(recs)["pg-1"]].count("duplicate") == 1
    applied = [rid for v in registry.list_versions(reg, "mnist-cnn")
               for rid in registry.read_manifest(reg, "mnist-cnn", v)["request_ids"]]
    assert sorted(applied) == ids
    assert not (state / "ledger.sqlite").exists()

    ledger = Ledger(url)
    assert ledger.engine == "postgresql" and ledger.verify_audit() == (4, None)
    assert all(ledger.request(rid)["status"] == "applied" for rid in ids) and ledger.outbox() == []
    ledger.close()
    monkeypatch.setenv("UNLEARND_STATE_URL", url)
    capsys.readouterr()
    assert main(["audit", "verify", "--config", str(cfg)]) == 0
    assert "audit trail ok: 4 entries" in capsys.readouterr().out
    postgres.drop_database(url)
