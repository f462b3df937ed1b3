"""The daemon with its registry on S3 (moto's real server) and its ledger on PostgreSQL: kill -9 at each of the crash
suite's points, at each step of a version's push (once with the working copy lost as well) and at random moments;
nothing lost, nothing applied twice, no half version ever visible in the bucket, and every restart completes the
push once."""

from __future__ import annotations

import random
import shutil
import time

import pytest

from daemon import registry
from daemon.pipeline.failpoints import POINTS, S3_POINTS
from daemon.registry.remote import S3Location, push_version
from tests.pipeline_harness import (
    DaemonProcess,
    outcome_receipts,
    produce_requests,
    read_topic,
    receipts_by_request,
    request,
    write_config,
)
from tests.s3_harness import S3Endpoint, moto_endpoint, read_bucket, s3  # noqa: F401 - fixtures

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
MODEL = "mnist-cnn"


def _visible(s3: S3Endpoint, prefix: str, scratch) -> tuple[int, list[str]]:
    """What a reader of the bucket sees: LATEST's version, pulled and hash-verified into a fresh folder, and
    every complete (manifest) version's request ids."""
    latest, pulled = read_bucket(s3, prefix, MODEL, scratch)
    ids = [rid for v in pulled for rid in registry.read_manifest(scratch, MODEL, v).get("request_ids", [])]
    return latest, ids


@pytest.mark.parametrize("ledger_db", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_kill_minus_9_at_each_failpoint_on_postgresql_and_s3_loses_nothing_and_shows_no_half_version(
        tmp_path, broker, mnist_registry, ledger_db, s3):
    prefix = "models/"
    client = s3.client()
    push_version(client, S3Location(s3.bucket, prefix), mnist_registry, MODEL, 1)     # the bucket's version 1
    reg = tmp_path / "registry"                                     # an empty working copy: pulled at start
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                       state_dir=tmp_path / "state", rounds="max_instances = 2")
    env = {**ledger_db.daemon_env(), "UNLEARND_REGISTRY_URL": f"s3://{s3.bucket}/{prefix}",
           "UNLEARND_REGISTRY_ENDPOINT_URL": s3.endpoint_url}
    ids = [f"s3crash-{i}" for i in range(14)]
    produce_requests(broker.bootstrap, [request(rid, "forget", [f"mnist-train:{300 + i}"])
                                        for i, rid in enumerate(ids)])
    log = tmp_path / "daemon.log"
    seen: list[int] = []
    # first the crash suite's own points (tests/test_pipeline_crash.py), on PostgreSQL + S3 here; then the push's:
    # the first lands in a round's push, the next two in the recovery's push of that round (it pushes again before it
    # rolls the round forward); before the last the working copy is lost: the round's version comes from the bucket
    # then two random moments (a kill inside an upload, a pull or a backoff lands wherever the clock says)
    points = [p for p in POINTS if p != "after_round_split"] + list(S3_POINTS) + ["random", "random"]
    rng = random.Random(11)
    for n, point in enumerate(points):
        d = DaemonProcess(cfg, log, env={**env, "UNLEARND_FAILPOINTS": point} if point != "random" else env)
        mark = len(d.events())
        d.start()
        try:
            if point == "random":
                d.wait_for(lambda e: e.get("event") == "daemon_started", timeout=60, after=mark)
                time.sleep(rng.uniform(1.0, 8.0))
            else:
                assert d.wait(timeout=90) == -9, d.tail()       # the failpoint killed it
        finally:
            d.kill()
        latest, applied = _visible(s3, prefix, tmp_path / f"scratch-{n}")
        assert len(applied) == len(set(applied)), "a request in two complete versions"
        seen.append(latest)
        if point == "s3_before_latest":     # the host's disk is lost: its manifest is in the bucket, LATEST is not
            shutil.rmtree(reg)
    assert seen == sorted(seen), f"the bucket's LATEST went backwards: {seen}"

    final = DaemonProcess(cfg, log, env=env).start()
    try:
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=240,
                          until=lambda rs: all(r in outcome_receipts(rs) for r in ids))
        assert final.terminate() == 0
    finally:
        final.kill()
    outcomes = outcome_receipts(recs)
    assert all(len(outcomes[rid]) == 1 for rid in ids), outcomes
    assert not [r for rs in receipts_by_request(recs).values() for r in rs if r["status"] == "duplicate"]
    latest, in_bucket = _visible(s3, prefix, tmp_path / "scratch-final")
    applied = sorted(rid for rid in ids if outcomes[rid][0]["status"] == "applied")
    assert sorted(in_bucket) == applied and applied, (in_bucket, outcomes)
    assert latest == registry.latest_version(reg, MODEL) == max(registry.list_versions(reg, MODEL))
    for rid in applied:        # the receipt's version is the bucket's version holding the request
        v = outcomes[rid][0]["model_version"]
        assert rid in registry.read_manifest(tmp_path / "scratch-final", MODEL, v)["request_ids"]
    events = [e.get("event") for e in d.events() + final.events()]
    assert events.count("registry_pulled") >= 2 and events.count("round_rolled_forward") >= 3, events
    config = client.get_object(Bucket=s3.bucket, Key=f"{prefix}{MODEL}/config.pbtxt")["Body"].read().decode()
    assert f"versions: [ {latest} ]" in config      # a Triton server pointed at the bucket loads LATEST's version
