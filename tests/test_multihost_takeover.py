"""Two daemons as two hosts (issue 24, part 3): separate processes and directories, sharing only a real PostgreSQL
ledger, the registry directory, the key files and a real Tansu broker; three models. The owner of a model is killed
(SIGKILL, by a failpoint) in the middle of its round's commit, after its version reached the registry and before
the ledger recorded it: the other daemon takes the model over, rolls that round forward and applies the rest
(re-delivered by Kafka from the committed offsets)."""

from __future__ import annotations

import time

import pytest

from daemon import registry
from tests.multihost_harness import MODELS, Cluster, bodies, send, shared_keys, tally, wait_outcomes
from tests.pipeline_harness import copy_registry

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_a_killed_owners_models_are_taken_over_and_every_request_is_applied_exactly_once(
        tmp_path, broker, postgres, mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry", names=MODELS)
    cluster = Cluster(tmp_path, broker.bootstrap, reg, postgres.new_database())
    keys = shared_keys(tmp_path / "secrets")
    started = time.monotonic()
    try:
        victim = cluster.start_host("host-1", failpoints="after_registry_write", keys=keys)
        victim.process.wait_assigned(timeout=120)
        survivor = cluster.start_host("host-2", keys=keys)
        owners = cluster.wait_split()
        taken = sorted(m for m, h in owners.items() if h is victim)
        # the victim's models: three requests each (a round of two dies mid-commit, one is left for the new owner)
        items = bodies({m: 3 if m in taken else 1 for m in MODELS})
        send(broker.bootstrap, items)
        assert victim.process.wait(timeout=180) == -9, victim.process.tail()      # killed mid-commit
        resolved = survivor.process.wait_for(
            lambda e: e.get("event") == "model_taken_over" and e.get("rounds_resolved"), timeout=120)
        assert resolved["model"] in taken
        records = wait_outcomes(broker.bootstrap, [b["request_id"] for b in items], timeout=240)
        assert survivor.process.terminate() == 0, survivor.process.tail()
    finally:
        cluster.stop()
    print(f"two-host takeover e2e: {time.monotonic() - started:.1f} s")
    t = tally(records, [b["request_id"] for b in items], reg, MODELS)
    n = len(items)
    assert (t.requests, t.applied, t.duplicates, t.lost) == (n, n, 0, 0), t
    assert not t.other, t.other
    rolled = [e for e in victim.process.events() if e.get("event") == "round_committed"]
    assert rolled == []                                  # the victim never finished a commit of its own
    for m in MODELS:        # LATEST names the newest version, published under an epoch no newer than the owner's
        latest = registry.latest_version(reg, m)
        assert latest == max(registry.list_versions(reg, m)) > 1
        epoch = registry.read_manifest(reg, m, latest).get("owner_epoch")
        assert 1 <= epoch <= survivor.owned()[m], (m, epoch, survivor.owned())
