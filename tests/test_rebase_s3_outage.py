"""A rebase whose registry is a bucket (moto's real S3 server) that goes away during the rebase (issue 24).

The store goes away once a rebase is asked for: the rebase's push waits out the outage as a round's does
(``registry_push_failed``, backoff) and publishes its version once the store is back; a stop during that wait
leaves the rebase ``committing`` and the next start's recovery pushes and commits it; a kill -9 inside the
rebase's push and again inside the recovery's loses nothing. Every check reads the bucket as a server would:
``LATEST``'s version pulled and hash-verified, every complete version pulled, exactly one of them the rebase's.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon import registry
from daemon.cli import main
from daemon.pipeline.ledger import Ledger
from daemon.registry.remote import S3Location, push_version
from tests.pipeline_harness import (
    DaemonProcess,
    copy_registry,
    produce_requests,
    read_topic,
    receipts_by_request,
    request,
    write_config,
)
from tests.s3_harness import RestartableS3, outage_s3, read_bucket  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

MODEL = "mnist-cnn"
PREFIX = "models/"
SOURCE = "mnist-train:0-9999"       # 10,000 digits: a rebase trains in seconds and passes the gate (rebase e2e)


def _setup(tmp_path: Path, broker, mnist_registry: Path, s3: RestartableS3, rounds: str = ""
           ) -> tuple[Path, Path, dict[str, str]]:
    """A working copy of the session's model, the bucket holding its version 1, and a daemon config with a rebase
    source whose registry.url is the bucket (the environment the daemon gets)."""
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    push_version(s3.client(), S3Location(s3.bucket, PREFIX), reg, MODEL, 1)
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=tmp_path / "state",
                       rounds=f"max_instances = 1\n{rounds}",
                       model_extra=f'[models.rebase]\nsource = "{SOURCE}"\nepochs = 1\n')
    env = {"UNLEARND_REGISTRY_URL": f"s3://{s3.bucket}/{PREFIX}", "UNLEARND_REGISTRY_ENDPOINT_URL": s3.endpoint_url}
    return reg, cfg, env


def _receipts(bootstrap: str, until) -> dict[str, list[dict]]:
    return receipts_by_request(read_topic(bootstrap, "unlearn.receipts", timeout=240,
                                          until=lambda rs: until(receipts_by_request(rs))))


def _statuses(by_request: dict[str, list[dict]], rid: str) -> list[str]:
    return sorted(r["status"] for r in by_request.get(rid, []))


def _apply(broker, ids: list[str]) -> None:
    produce_requests(broker.bootstrap, [request(rid, refs=[f"mnist-train:{100 + i}"]) for i, rid in enumerate(ids)])
    _receipts(broker.bootstrap, lambda by: all(_statuses(by, r) == ["applied"] for r in ids))


def _wait_count(d: DaemonProcess, event: str, n: int, timeout: float) -> list[dict]:
    """The first ``n`` log events named ``event``; the daemon must stay up and the rebase must not end meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        events = d.events()
        found = [e for e in events if e.get("event") == event]
        if len(found) >= n:
            return found[:n]
        ended = [e for e in events if e.get("event") in ("rebase_committed", "rebase_failed")]
        assert not ended, f"the rebase ended after {len(found)} {event} event(s): {ended}"
        assert d.proc is not None and d.proc.poll() is None, f"daemon exited with {d.proc.returncode}:\n{d.tail()}"
        assert time.monotonic() < deadline, f"{len(found)} of {n} {event} events:\n{d.tail()}"
        time.sleep(0.05)


def _bucket(s3: RestartableS3, scratch: Path) -> tuple[int, dict[int, str]]:
    """What a reader of the bucket sees: LATEST's version (pulled, every file's sha256 checked) and every complete
    (manifest) version pulled and verified, with the round or rebase id that wrote it."""
    latest, pulled = read_bucket(s3, PREFIX, MODEL, scratch)
    return latest, {v: registry.read_manifest(scratch, MODEL, v).get("round_id") for v in pulled}


def _ledger_job(tmp_path: Path) -> dict:
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    try:
        jobs = ledger.rebases(model=MODEL)
        assert len(jobs) == 1, jobs
        assert ledger.verify_audit()[1] is None
        return jobs[0]
    finally:
        ledger.close()


def _check_published_once(tmp_path: Path, s3: RestartableS3, reg: Path, version: int, rebase_id: str,
                          by: dict[str, list[dict]], ids: list[str]) -> None:
    """The rebase's version is the bucket's LATEST, in it once and whole; one exact receipt per request, for it."""
    latest, writers = _bucket(s3, tmp_path / "scratch")
    assert latest == version == registry.latest_version(reg, MODEL)
    assert [v for v, rid in writers.items() if rid == rebase_id] == [version], writers
    assert sorted(writers) == registry.list_versions(reg, MODEL), "the bucket and the working copy differ"
    manifest = registry.read_manifest(tmp_path / "scratch", MODEL, version)
    assert manifest["method"]["name"] == "rebase" and manifest["round_id"] == rebase_id
    for rid in ids:
        assert _statuses(by, rid) == ["applied", "exact"], by.get(rid)
        exact = next(r for r in by[rid] if r["status"] == "exact")
        assert exact["model_version"] == version and exact["rebase_id"] == rebase_id
    job = _ledger_job(tmp_path)
    assert (job["state"], job["version"], job["rebase_id"]) == ("committed", version, rebase_id)


def test_a_rebases_push_waits_out_a_bucket_that_goes_away_and_publishes_its_version_once(
        tmp_path, broker, mnist_registry, outage_s3):  # noqa: F811 - the fixture
    s3 = outage_s3
    reg, cfg, env = _setup(tmp_path, broker, mnist_registry, s3)
    ids = ["o-1", "o-2"]
    d = DaemonProcess(cfg, tmp_path / "daemon.log", env=env).start()
    try:
        d.wait_assigned(timeout=120)
        _apply(broker, ids)
        serving = registry.latest_version(reg, MODEL)
        assert _bucket(s3, tmp_path / "scratch")[0] == serving          # the rounds' versions reached the bucket
        assert main(["rebase", "--config", str(cfg), "--model", MODEL]) == 0
        # the store goes away before the rebase starts (nothing else of an idle daemon reads or writes the bucket,
        # so a slow poll here cannot let the push through first); it trains meanwhile, and its push meets the outage
        s3.stop()
        d.wait_for(lambda e: e.get("event") == "rebase_training", timeout=60)
        failed = _wait_count(d, "registry_push_failed", 2, timeout=180)     # tried, backed off, tried again
        s3.start()
        committed = d.wait_for(lambda e: e.get("event") == "rebase_committed", timeout=120)
        by = _receipts(broker.bootstrap, lambda by: all("exact" in _statuses(by, r) for r in ids))
        assert d.proc.poll() is None, "the daemon exited"
        assert d.terminate() == 0
    finally:
        d.kill()

    version = committed["version"]
    assert version == serving + 1
    assert {(e["model"], e["version"]) for e in failed} == {(MODEL, version)}, failed   # the rebase's push waited
    assert [e["retry_s"] for e in failed] == [0.5, 1.0]
    events = [e.get("event") for e in d.events()]
    assert events.count("daemon_started") == 1 and "rebase_failed" not in events and "rebase_crashed" not in events
    _check_published_once(tmp_path, s3, reg, version, committed["rebase_id"], by, ids)
    assert _ledger_job(tmp_path)["attempts"] == 1                      # it ran once: not restarted, not redone


def test_a_stop_while_the_rebases_push_waits_leaves_it_committing_and_the_recovery_publishes_it_once(
        tmp_path, broker, mnist_registry, outage_s3):  # noqa: F811 - the fixture
    s3 = outage_s3
    reg, cfg, env = _setup(tmp_path, broker, mnist_registry, s3, rounds="grace_period_s = 1")
    ids = ["w-1", "w-2"]
    log = tmp_path / "daemon.log"
    d = DaemonProcess(cfg, log, env=env).start()
    try:
        d.wait_assigned(timeout=120)
        _apply(broker, ids)
        serving = registry.latest_version(reg, MODEL)
        assert main(["rebase", "--config", str(cfg), "--model", MODEL]) == 0
        s3.stop()
        _wait_count(d, "registry_push_failed", 1, timeout=180)
        assert d.terminate(timeout=90) == 0     # SIGTERM while the push waits: past the grace period it gives up
    finally:
        d.kill()
    events = [e.get("event") for e in d.events()]
    assert "rebase_failed" not in events and "rebase_committed" not in events, events
    assert "rebase_push_interrupted" in events
    job = _ledger_job(tmp_path)
    assert job["state"] == "committing", job            # its version is written here: the recovery's to finish
    rebase_id = job["rebase_id"]
    s3.start()
    latest, writers = _bucket(s3, tmp_path / "scratch")
    assert latest == serving and rebase_id not in writers.values(), writers      # nothing of it in the bucket

    # kill -9 inside the next start's push of it, twice (before the bucket's LATEST moves; after it moved, before
    # the ledger commits); the bucket never shows a half version and its LATEST only moves forward
    for point, expected in (("s3_before_latest", serving), ("s3_after_latest", serving + 1)):
        crashed = DaemonProcess(cfg, log, env={**env, "UNLEARND_FAILPOINTS": point}).start()
        try:
            assert crashed.wait(timeout=120) == -9, crashed.tail()
        finally:
            crashed.kill()
        assert _bucket(s3, tmp_path / "scratch")[0] == expected, point
        assert _ledger_job(tmp_path)["state"] == "committing", point

    final = DaemonProcess(cfg, log, env=env).start()
    try:
        final.wait_assigned(timeout=120)
        by = _receipts(broker.bootstrap, lambda by: all("exact" in _statuses(by, r) for r in ids))
        assert final.terminate() == 0
    finally:
        final.kill()
    rolled = [e for e in final.events() if e.get("event") == "rebase_rolled_forward"]
    # the s3_before_latest kill came in the start-up's catch-up push (the working copy's LATEST is the rebase's), before
    # the rebase's recovery; the s3_after_latest one in the recovery's own push; the last start finished it
    assert [(e["rebase_id"], e["version"]) for e in rolled] == [(rebase_id, serving + 1)] * 2, rolled
    _check_published_once(tmp_path, s3, reg, serving + 1, rebase_id, by, ids)
    assert _ledger_job(tmp_path)["attempts"] == 1               # rolled forward, never trained again


def test_kill_minus_9_inside_the_rebases_own_push_and_the_restart_publishes_it_once(
        tmp_path, broker, mnist_registry, outage_s3):  # noqa: F811 - the fixture
    s3 = outage_s3
    reg, cfg, env = _setup(tmp_path, broker, mnist_registry, s3)
    ids = ["x-1", "x-2"]
    log = tmp_path / "daemon.log"
    d = DaemonProcess(cfg, log, env=env).start()
    try:
        d.wait_assigned(timeout=120)
        _apply(broker, ids)                 # the rounds' pushes pass the S3 failpoints too: applied before them
        assert d.terminate() == 0
    finally:
        d.kill()
    serving = registry.latest_version(reg, MODEL)
    assert main(["rebase", "--config", str(cfg), "--model", MODEL]) == 0       # the next start runs it
    crashed = DaemonProcess(cfg, log, env={**env, "UNLEARND_FAILPOINTS": "s3_before_manifest"}).start()
    try:
        assert crashed.wait(timeout=180) == -9, crashed.tail()     # its files uploaded, its manifest not yet
    finally:
        crashed.kill()
    assert any(e.get("event") == "rebase_trained" for e in crashed.events())     # the kill came in the rebase's push
    job = _ledger_job(tmp_path)
    assert job["state"] == "committing", job
    latest, writers = _bucket(s3, tmp_path / "scratch")
    assert latest == serving and serving + 1 not in writers, writers      # uploaded files without a manifest: unseen
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"{PREFIX}{MODEL}/{serving + 1}/").get("Contents", [])
    assert listed and not [o for o in listed if o["Key"].endswith("/manifest.json")], listed

    final = DaemonProcess(cfg, log, env=env).start()
    try:
        final.wait_assigned(timeout=120)
        by = _receipts(broker.bootstrap, lambda by: all("exact" in _statuses(by, r) for r in ids))
        assert final.terminate() == 0
    finally:
        final.kill()
    rolled = [e for e in final.events() if e.get("event") == "rebase_rolled_forward"]
    assert [(e["rebase_id"], e["version"]) for e in rolled] == [(job["rebase_id"], serving + 1)], rolled
    _check_published_once(tmp_path, s3, reg, serving + 1, job["rebase_id"], by, ids)
    assert _ledger_job(tmp_path)["attempts"] == 1
