"""Exact rebases end to end: a real broker, the daemon as a subprocess, MNIST, and kill -9 inside a rebase."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import keys, registry
from daemon.cli import main
from daemon.data.content import content_sha256_rows
from daemon.data.mnist import load_mnist
from daemon.pipeline.failpoints import REBASE_POINTS
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.rebase_set import snapshot_digest
from daemon.registry import model_store
from tests.pipeline_harness import (
    DaemonProcess,
    copy_registry,
    free_port,
    produce_requests,
    read_topic,
    receipts_by_request,
    request,
    write_config,
)

pytestmark = pytest.mark.slow

MODEL = "mnist-cnn"


def _rebase_table(source: str, **policy: int) -> str:
    keys = "".join(f"{k} = {v}\n" for k, v in policy.items())
    return f'[models.rebase]\nsource = "{source}"\nepochs = 1\n{keys}'


def _receipts(bootstrap: str, until) -> dict[str, list[dict]]:
    return receipts_by_request(read_topic(bootstrap, "unlearn.receipts", timeout=300,
                                          until=lambda rs: until(receipts_by_request(rs))))


def _statuses(by_request: dict[str, list[dict]], rid: str) -> list[str]:
    return sorted(r["status"] for r in by_request.get(rid, []))


def _index(events: list[dict], predicate) -> int:
    return next(i for i, e in enumerate(events) if predicate(e))


def test_a_rebase_trains_beside_rounds_re_applies_them_in_order_and_upgrades_receipts_to_exact(
        tmp_path, broker, mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=tmp_path / "state",
                       rounds="max_instances = 1", model_extra=_rebase_table("mnist-train:0-29999"))
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        d.wait_assigned(timeout=120)
        before = ["a-1", "a-2", "a-3"]
        produce_requests(broker.bootstrap, [request(rid, refs=[f"mnist-train:{100 + i}"])
                                            for i, rid in enumerate(before)])
        _receipts(broker.bootstrap, lambda by: all(_statuses(by, r) == ["applied"] for r in before))
        assert main(["rebase", "--config", str(cfg), "--model", MODEL]) == 0
        d.wait_for(lambda e: e.get("event") == "rebase_training", timeout=60)
        during = ["b-1", "b-2"]      # arrive while it trains: applied at once on the serving lineage
        produce_requests(broker.bootstrap, [request(rid, refs=[f"mnist-train:{200 + i}"])
                                            for i, rid in enumerate(during)])
        trained = d.wait_for(lambda e: e.get("event") == "rebase_trained", timeout=300)
        produce_requests(broker.bootstrap, [request("c-1", refs=["mnist-train:300"])])
        committed = d.wait_for(lambda e: e.get("event") == "rebase_committed", timeout=300)
        by = _receipts(broker.bootstrap, lambda by: all("exact" in _statuses(by, r) for r in before)
                       and _statuses(by, "c-1") == ["applied"])
        assert d.terminate() == 0
    finally:
        d.kill()

    events = d.events()
    # rounds were not held up by the training: b-1 and b-2 were committed between its start and its end
    start = _index(events, lambda e: e.get("event") == "rebase_training")
    end = _index(events, lambda e: e.get("event") == "rebase_trained")
    during_rounds = [e for e in events[start:end] if e.get("event") == "round_committed"]
    assert len(during_rounds) == 2, [e.get("event") for e in events[start:end]]
    version = committed["version"]
    manifest = registry.read_manifest(reg, MODEL, version)
    method = manifest["method"]
    assert manifest["round_id"] == committed["rebase_id"] and method["name"] == "rebase"
    assert method["reapplied"] == during            # re-applied after it, in their order
    assert method["excluded"] == 3 and method["forgotten"] == 3 and trained["excluded"] == 3
    state_key = keys.read_key(tmp_path / "state" / "keys" / "state.key", "state")     # made by the daemon
    files = model_store.session_files(registry.verify_version(reg, MODEL, version), state_key)
    session = json.loads(files[model_store.SESSION_META])
    assert session["rounds_applied"] == 2           # a fresh continual state: only the re-applied rounds in it
    # c-1 came once training was over: applied after the rebase, on its lineage
    c1 = next(r for r in by["c-1"] if r["status"] == "applied")
    assert c1["model_version"] > version
    # exact once per request it left out; b-1 and b-2 were trained on, so they are not exact yet
    for rid in before:
        exact = [r for r in by[rid] if r["status"] == "exact"]
        assert len(exact) == 1 and exact[0]["model_version"] == version
        assert [i["rebase"] for i in exact[0]["instances"]] == ["excluded"]
    assert all("exact" not in _statuses(by, rid) for rid in during + ["c-1"])
    # the rebase left out every instance forgotten up to its snapshot, checked by hash against the ledger
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    job = ledger.rebases(model=MODEL)[0]
    assert job["state"] == "committed" and job["version"] == version
    rows = ledger.forgotten_content(MODEL, upto_seq=job["snapshot_seq"])
    assert {r.request_id for r in rows} == set(before) and method["digest"] == snapshot_digest(rows)
    m = load_mnist()
    id_key = keys.read_key(tmp_path / "state" / "keys" / "id.key", "id")
    assert {r.content_sha256 for r in rows} == set(content_sha256_rows(m.train_x[100:103], id_key))   # keyed
    assert ledger.verify_audit()[1] is None


def test_kill_minus_9_inside_a_rebase_leaves_the_old_version_serving_and_the_rebase_resumes(
        tmp_path, broker, mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=tmp_path / "state",
                       rounds="max_instances = 4", model_extra=_rebase_table("mnist-train:0-9999"))
    log = tmp_path / "daemon.log"
    d = DaemonProcess(cfg, log).start()
    ids = ["k-1", "k-2"]
    try:
        d.wait_assigned(timeout=120)
        produce_requests(broker.bootstrap, [request(rid, refs=[f"mnist-train:{400 + i}"]) for i, rid in enumerate(ids)])
        _receipts(broker.bootstrap, lambda by: all(_statuses(by, r) == ["applied"] for r in ids))
        serving = registry.latest_version(reg, MODEL)
        assert main(["rebase", "--config", str(cfg), "--model", MODEL]) == 0
        d.wait_for(lambda e: e.get("event") == "rebase_training", timeout=60)
        assert d.terminate() == 0        # SIGTERM while it trains: it stops at the next step, to run again later
    finally:
        d.kill()
    assert any(e.get("event") == "rebase_aborted" for e in d.events())
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    assert ledger.rebases(model=MODEL)[0]["state"] == "requested"
    ledger.close()
    assert registry.latest_version(reg, MODEL) == serving

    states = []
    for point in REBASE_POINTS:
        crashed = DaemonProcess(cfg, log, env={"UNLEARND_FAILPOINTS": point}).start()
        try:
            assert crashed.wait(timeout=300) == -9, crashed.tail()
        finally:
            crashed.kill()
        ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
        states.append(ledger.rebases(model=MODEL)[0]["state"])
        ledger.close()
        for v in registry.list_versions(reg, MODEL):
            registry.verify_version(reg, MODEL, v)           # nothing half-written is visible
        if point != "rebase_after_publish":
            assert registry.latest_version(reg, MODEL) == serving, point
    assert states == ["running", "committing", "committing"]
    assert registry.latest_version(reg, MODEL) == serving + 1      # written, not yet committed by the ledger

    final = DaemonProcess(cfg, log).start()
    try:
        final.wait_assigned(timeout=120)
        by = _receipts(broker.bootstrap, lambda by: all("exact" in _statuses(by, r) for r in ids))
        assert final.terminate() == 0
    finally:
        final.kill()
    events = final.events()
    assert [e["event"] for e in events if e.get("event", "").startswith("rebase_r")] == [
        "rebase_restarted", "rebase_restarted", "rebase_rolled_forward"]
    for rid in ids:      # one exact receipt per request, once, across every crash
        assert _statuses(by, rid) == ["applied", "exact"]
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    job = ledger.rebases(model=MODEL)[0]
    assert job["state"] == "committed" and job["version"] == serving + 1 and job["attempts"] == 4
    assert registry.latest_version(reg, MODEL) == serving + 1
    assert ledger.verify_audit()[1] is None
    assert not [p for p in (reg / MODEL).iterdir() if p.name.startswith(".tmp")], "temporaries left"


def _metric(port: int, name: str, **labels: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_every_deletions_starts_a_rebase_by_itself_and_the_metrics_count_it(tmp_path, broker, mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    port = free_port()
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg, state_dir=tmp_path / "state",
                       rounds="max_instances = 2", metrics_port=port,
                       model_extra=_rebase_table("mnist-train:0-9999", every_deletions=3))
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        d.wait_assigned(timeout=120)
        assert _metric(port, "unlearnd_rebase_running", model=MODEL) in (None, 0.0)
        produce_requests(broker.bootstrap, [request("e-1", refs=["mnist-train:1", "mnist-train:2"])])
        _receipts(broker.bootstrap, lambda by: _statuses(by, "e-1") == ["applied"])
        time.sleep(2.5)                                  # two policy checks: 2 of 3 deletions, nothing starts
        assert not any(e.get("event") == "rebase_started" for e in d.events())
        produce_requests(broker.bootstrap, [request("e-2", refs=["mnist-train:3"])])
        committed = d.wait_for(lambda e: e.get("event") in ("rebase_committed", "rebase_failed"), timeout=300)
        assert committed["event"] == "rebase_committed", committed      # 5,000 digits were too few for the gate
        by = _receipts(broker.bootstrap, lambda by: all("exact" in _statuses(by, r) for r in ("e-1", "e-2")))
        deadline = time.monotonic() + 30
        while _metric(port, "unlearnd_rebases_total", model=MODEL, outcome="committed") != 1.0:
            assert time.monotonic() < deadline, "the rebase was not counted"
            time.sleep(0.2)
        assert _metric(port, "unlearnd_rebase_running", model=MODEL) == 0.0
        assert _metric(port, "unlearnd_model_version", model=MODEL) == committed["version"]
        time.sleep(2.5)                                  # nothing forgotten since: no second rebase
        assert d.terminate() == 0
    finally:
        d.kill()
    assert sum(e.get("event") == "rebase_started" for e in d.events()) == 1
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    assert [(r["trigger"], r["state"]) for r in ledger.rebases()] == [("every_deletions", "committed")]
    assert [i["rebase"] for i in next(r for r in by["e-1"] if r["status"] == "exact")["instances"]] == [
        "excluded", "excluded"]
