"""A daemon on a PostgreSQL ledger through outages of its database (issue 24): a managed database restarts or fails
over. Between rounds the daemon waits it out and reads the same messages again; inside a round it stops (exit 75)
and the restart's recovery resolves the round. Either way every request ends with exactly one outcome."""

from __future__ import annotations


import pytest

from daemon import registry
from daemon.pipeline.lifecycle import EXIT_LEDGER_LOST
from tests.pg_harness import PostgresServer
from tests.pipeline_harness import (
    DaemonProcess,
    copy_registry,
    outcome_receipts,
    produce_requests,
    read_topic,
    request,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_the_daemon_waits_out_a_postgresql_outage_and_each_request_ends_once(tmp_path, broker, mnist_registry):
    server = PostgresServer().start()
    try:
        url = server.new_database()
        reg = copy_registry(mnist_registry, tmp_path / "registry")
        cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                           state_dir=tmp_path / "state", rounds="max_instances = 32")
        env = {"UNLEARND_STATE_URL": url}
        d = DaemonProcess(cfg, tmp_path / "daemon.log", env=env).start()
        try:
            d.wait_for(lambda e: e.get("event") == "daemon_started", timeout=90)
            # 1. between rounds: the database goes away while requests arrive; the daemon retries, never exits
            server._shutdown()
            between = ["out-1", "out-2"]
            produce_requests(broker.bootstrap, [request(rid, "forget", [f"mnist-train:{600 + i}"])
                                                for i, rid in enumerate(between)])
            d.wait_for(lambda e: e.get("event") == "ledger_unavailable" and e.get("attempt", 0) >= 2, timeout=60)
            server._launch()
            read_topic(broker.bootstrap, "unlearn.receipts", timeout=120,
                       until=lambda rs: all(r in outcome_receipts(rs) for r in between))
            assert d.proc.poll() is None, d.tail()

            # 2. inside a round: the daemon stops with EX_TEMPFAIL, its round left to the restart's recovery
            mark = len(d.events())
            produce_requests(broker.bootstrap, [request("in-round", "forget",
                                                        [f"mnist-train:{700 + i}" for i in range(12)])])
            d.wait_for(lambda e: e.get("event") == "round_started", timeout=60, after=mark)
            server._shutdown()
            assert d.wait(timeout=120) == EXIT_LEDGER_LOST, d.tail()
        finally:
            d.kill()
        assert any(e.get("event") == "ledger_lost_in_round" for e in d.events()), d.tail()
        server._launch()
        d2 = DaemonProcess(cfg, tmp_path / "daemon2.log", env=env).start()
        try:
            recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=240,
                              until=lambda rs: "in-round" in outcome_receipts(rs))
            assert d2.terminate() == 0, d2.tail()
        finally:
            d2.kill()
    finally:
        server.stop()

    outcomes = outcome_receipts(recs)
    for rid in [*between, "in-round"]:
        assert [r["status"] for r in outcomes[rid]] == ["applied"], (rid, outcomes.get(rid))
    applied = [rid for v in registry.list_versions(reg, "mnist-cnn")
               for rid in registry.read_manifest(reg, "mnist-cnn", v)["request_ids"]]
    assert sorted(applied) == sorted([*between, "in-round"]), applied
    assert any(e.get("event") == "ledger_reconnected" for e in d.events()), d.tail()
