"""Two daemons as two hosts (issue 24, part 3): separate processes and directories, sharing only a real PostgreSQL
ledger, the registry (a shared directory, or an S3 bucket with a working copy per host), the key files and a real
Tansu broker; three models. The owner of a model is killed
(SIGKILL, by a failpoint) in the middle of its round's commit, after its version reached the registry and before
the ledger recorded it: the other daemon takes the model over, rolls that round forward and applies the rest
(re-delivered by Kafka from the committed offsets)."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest

from daemon import registry
from daemon.registry.mirror import RegistryMirror
from daemon.registry.remote import S3Location, make_client, push_version
from tests.multihost_harness import MODELS, Cluster, bodies, send, shared_keys, tally, wait_outcomes
from tests.pipeline_harness import copy_registry
from tests.s3_harness import moto_endpoint  # noqa: F401 - fixture

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _bucket_view(mirror: RegistryMirror, scratch: Path) -> Path:
    """Every complete version in the bucket, pulled and hash-verified into a fresh folder (what a reader sees)."""
    shutil.rmtree(scratch, ignore_errors=True)
    view = RegistryMirror(mirror.client, mirror.loc, scratch)
    for m in MODELS:
        _pulled, failed = view.pull_all(m)              # LATEST of the view set to the bucket's
        assert not failed, failed
        assert registry.latest_version(scratch, m) == view.latest(m) is not None
    return scratch


def _bucket(endpoint: str, reg: Path, scratch: Path) -> tuple[RegistryMirror, dict[str, str]]:
    """A fresh bucket holding version 1 of each model, and the settings that point a daemon at it."""
    loc = S3Location(f"t-{uuid.uuid4().hex[:12]}", "models/")
    client = make_client(endpoint)
    client.create_bucket(Bucket=loc.bucket)
    for m in MODELS:
        push_version(client, loc, reg, m, 1)
    env = {"UNLEARND_REGISTRY_URL": f"s3://{loc.bucket}/{loc.prefix}", "UNLEARND_REGISTRY_ENDPOINT_URL": endpoint}
    return RegistryMirror(client, loc, scratch), env


@pytest.mark.parametrize("storage", ["volume", "bucket"])
def test_a_killed_owners_models_are_taken_over_and_every_request_is_applied_exactly_once(
        tmp_path, broker, postgres, mnist_registry, storage, request):
    reg = copy_registry(mnist_registry, tmp_path / "registry", names=MODELS)
    bucket_env, mirror = None, None
    if storage == "bucket":         # each host its own empty working copy; version 1 of each model in the bucket
        mirror, bucket_env = _bucket(request.getfixturevalue("moto_endpoint"), reg, tmp_path / "unused")
    cluster = Cluster(tmp_path, broker.bootstrap, reg, postgres.new_database(), bucket_env=bucket_env)
    keys = shared_keys(tmp_path / "secrets")
    started = time.monotonic()
    try:
        # killed with its version in the registry and the ledger not told: on a bucket, after the bucket's LATEST
        # moved, so the new owner must bring that version into its own working copy before it rolls the round on
        point = "after_registry_write" if storage == "volume" else "s3_after_latest"
        victim = cluster.start_host("host-1", failpoints=point, keys=keys)
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
        if storage == "bucket":
            assert any(e.get("event") == "round_rolled_forward" for e in survivor.process.events()), \
                survivor.process.tail()
        records = wait_outcomes(broker.bootstrap, [b["request_id"] for b in items], timeout=240)
        assert survivor.process.terminate() == 0, survivor.process.tail()
    finally:
        cluster.stop()
    print(f"two-host takeover e2e ({storage}): {time.monotonic() - started:.1f} s")
    if mirror is not None:
        reg = _bucket_view(mirror, tmp_path / "bucket-view")
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


def test_on_a_bucket_the_new_owner_builds_on_the_versions_the_killed_one_published(
        tmp_path, broker, postgres, mnist_registry, moto_endpoint):  # noqa: F811 - the fixture
    """Hosts with their own working copies: an owner publishes a version of each of its models, then dies between
    rounds; the other host's copy is older, so it must take the bucket's LATEST (continual state with it) before
    its first round of those models, or it would publish a version number the bucket already holds."""
    reg = copy_registry(mnist_registry, tmp_path / "registry", names=MODELS)
    mirror, env = _bucket(moto_endpoint, reg, tmp_path / "unused")
    cluster = Cluster(tmp_path, broker.bootstrap, reg, postgres.new_database(), bucket_env=env)
    keys = shared_keys(tmp_path / "secrets")
    try:
        first = cluster.start_host("host-1", keys=keys)
        first.process.wait_assigned(timeout=120)
        second = cluster.start_host("host-2", keys=keys)
        owners = cluster.wait_split()
        victim = owners[MODELS[0]]
        taken = sorted(m for m, h in owners.items() if h is victim)
        before = bodies({m: 1 for m in MODELS}, prefix="before")
        send(broker.bootstrap, before)
        wait_outcomes(broker.bootstrap, [b["request_id"] for b in before], timeout=240)
        assert all(mirror.latest(m) == 2 for m in MODELS)
        victim.process.kill()                                   # between rounds: nothing of its is unfinished
        survivor = second if victim is first else first
        after = bodies({m: 1 for m in MODELS}, prefix="after", first=2000)
        send(broker.bootstrap, after)
        records = wait_outcomes(broker.bootstrap, [b["request_id"] for b in before + after], timeout=240)
        assert survivor.process.terminate() == 0, survivor.process.tail()
    finally:
        cluster.stop()
    pulled = [e["model"] for e in survivor.process.events()
              if e.get("event") == "registry_pulled" and e.get("reason") == "takeover"]
    assert sorted(pulled) == taken, (pulled, taken)
    # (without that pull its first round of such a model met "version 2 already exists in the bucket" and crashed)
    assert not [e for e in survivor.process.events() if e.get("event") == "round_crashed"], survivor.process.tail()
    view = _bucket_view(mirror, tmp_path / "bucket-view")
    ids = [b["request_id"] for b in before + after]
    t = tally(records, ids, view, MODELS)
    assert (t.requests, t.applied, t.duplicates, t.lost) == (len(ids), len(ids), 0, 0), t
    for m in MODELS:                                            # one chain: 1 -> 2 (either host) -> 3 (the survivor)
        assert registry.list_versions(view, m) == [1, 2, 3]
        assert [registry.read_manifest(view, m, v)["parent"] for v in (2, 3)] == [1, 2]
