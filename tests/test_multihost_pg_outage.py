"""A PostgreSQL outage during a partition assignment (issue 24): two daemons as two hosts share one PostgreSQL
ledger, a registry directory and a Tansu broker. The owner of a model is killed (SIGKILL by a failpoint, its round's
version in the registry and the ledger not told) and the database is stopped at once, so the survivor's
assignment of the dead daemon's partitions runs while the ledger is away. The survivor must defer the takeover,
run no round of those models meanwhile, and take them over once the database is back: the killed round rolled
forward, every request one applied receipt, no version twice."""

from __future__ import annotations

import time

import pytest

from daemon import registry
from tests.multihost_harness import MODELS, Cluster, bodies, send, shared_keys, tally, wait_outcomes
from tests.pg_harness import PostgresServer
from tests.pipeline_harness import copy_registry

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_a_takeover_during_a_postgresql_outage_waits_for_the_database_and_applies_every_request_once(
        tmp_path, broker, mnist_registry):
    server = PostgresServer().start()       # its own server: this test stops it
    reg = copy_registry(mnist_registry, tmp_path / "registry", names=MODELS)
    cluster = Cluster(tmp_path, broker.bootstrap, reg, server.new_database())
    keys = shared_keys(tmp_path / "secrets")
    started = time.monotonic()
    try:
        victim = cluster.start_host("host-1", failpoints="after_registry_write", keys=keys)
        victim.process.wait_assigned(timeout=120)
        survivor = cluster.start_host("host-2", keys=keys)
        owners = cluster.wait_split()
        taken = sorted(m for m, h in owners.items() if h is victim)
        # only the victim's models get requests: the survivor is idle (a round of its own when the database goes
        # away would stop it with exit 75, another case, tests/test_ledger_pg_outage.py)
        items = bodies({m: 3 for m in taken})
        mark = len(survivor.process.events())
        send(broker.bootstrap, items)
        assert victim.process.wait(timeout=120) == -9, victim.process.tail()      # killed mid-commit
        server._shutdown()                  # before the group hands the survivor the dead daemon's partitions
        survivor.process.wait_for(lambda e: e.get("event") == "partitions_assigned" and
                                  len(e.get("partitions") or ()) == 4, timeout=60, after=mark)
        time.sleep(3.0)                     # the survivor tries (and retries) its takeover while the database is down
        server._launch()
        records = wait_outcomes(broker.bootstrap, [b["request_id"] for b in items], timeout=90)
        assert survivor.process.terminate() == 0, survivor.process.tail()
    finally:
        cluster.stop()
        server.stop()
    print(f"takeover through a PostgreSQL outage e2e: {time.monotonic() - started:.1f} s")
    events = survivor.process.events()[mark:]
    names = [e.get("event") for e in events]
    deferred = sorted({e["model"] for e in events if e.get("event") == "takeover_deferred"})
    resumed = sorted({e["model"] for e in events if e.get("event") == "takeover_resumed"})
    # the dead daemon's models, and the survivor's own (whether anybody took them in between cannot be read either)
    assert set(taken) <= set(deferred) and deferred == resumed, (deferred, resumed, taken)
    assert "assign_handling_failed" not in names
    # no round of a deferred model started before its takeover resumed
    for m in taken:
        first_round = next(i for i, e in enumerate(events) if e.get("event") == "round_started" and e["model"] == m)
        back = next(i for i, e in enumerate(events) if e.get("event") == "takeover_resumed" and e["model"] == m)
        assert back < first_round, (m, back, first_round)
    assert any(e.get("event") == "round_rolled_forward" for e in events), survivor.process.tail()
    t = tally(records, [b["request_id"] for b in items], reg, MODELS)
    n = len(items)
    assert (t.requests, t.applied, t.duplicates, t.lost) == (n, n, 0, 0), t
    assert not t.other, t.other
    for m in taken:         # LATEST is the newest version, published under the survivor's epoch
        latest = registry.latest_version(reg, m)
        assert latest == max(registry.list_versions(reg, m)) > 2
        assert registry.read_manifest(reg, m, latest).get("owner_epoch") == survivor.owned()[m]
