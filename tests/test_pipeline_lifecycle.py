"""Start-up checks, the retention gate, and failed rounds retried in halves."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from daemon import registry
from daemon.registry import model_store
from tests.pipeline_harness import (
    ROOT,
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


def _run(config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_retention_gate_fails_the_round_and_leaves_the_model_as_it_was(tmp_path, mnist_registry):
    broker = Broker().start()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    # the probe holds the very instances to forget: forgetting them must cost it more than 2 points
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                       state_dir=tmp_path / "state", probe="mnist-train:0-99", retention_max_drop=0.02,
                       rounds="held_impressions = 32")
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        d.wait_assigned()
        produce_requests(broker.bootstrap, [request("gate-1", "forget", [f"mnist-train:{i}" for i in range(10)])])
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=120,
                          until=lambda rs: "gate-1" in outcome_receipts(rs))
        assert d.terminate() == 0
    finally:
        d.kill()
        broker.stop()
    (r,) = outcome_receipts(recs)["gate-1"]
    assert r["status"] == "failed" and r["reason"].startswith("retention gate"), r
    assert r["model_version"] == 1 and r["model_sha256"] is None
    assert r["method"]["params"]["held_impressions"] == 32      # the daemon's setting reached the round
    assert registry.list_versions(reg, "mnist-cnn") == [1]


def test_a_failed_round_is_retried_in_halves_so_only_the_request_that_cannot_be_unlearned_fails(
        tmp_path, mnist_registry):
    broker = Broker().start()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    # "hard" forgets ten probe instances (a ~10-point drop against a 6-point gate); the other two forget one
    # instance each outside the probe (~3 points on the fragile test model). Batched together, the round fails.
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                       state_dir=tmp_path / "state", probe="mnist-train:0-99", retention_max_drop=0.06)
    ids = ("hard", "easy-1", "easy-2")
    log = tmp_path / "daemon.log"
    # the first daemon dies (kill -9) right after the first split is durable; the next one starts over
    first = DaemonProcess(cfg, log, env={"UNLEARND_FAILPOINTS": "after_round_split"}).start()
    try:
        first.wait_assigned()
        produce_requests(broker.bootstrap, [request("hard", "forget", [f"mnist-train:{i}" for i in range(10)]),
                                            request("easy-1", "forget", ["mnist-train:1000"]),
                                            request("easy-2", "forget", ["mnist-train:1001"])])
        assert first.wait(timeout=120) == -9
        d = DaemonProcess(cfg, log).start()
        try:
            recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=180,
                              until=lambda rs: all(i in outcome_receipts(rs) for i in ids))
            assert d.terminate() == 0
        finally:
            d.kill()
    finally:
        first.kill()
        broker.stop()
    got = outcome_receipts(recs)
    assert all(len(got[i]) == 1 for i in ids), got
    hard, easy1, easy2 = (got[i][0] for i in ids)
    assert hard["status"] == "failed" and hard["reason"].startswith("retention gate"), hard
    assert easy1["status"] == "applied" and easy2["status"] == "applied", (easy1, easy2)
    assert sorted([easy1["model_version"], easy2["model_version"]]) == [2, 3]
    assert registry.list_versions(reg, "mnist-cnn") == [1, 2, 3]
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    rounds = [(json.loads(r[0]), r[1]) for r in db.execute("SELECT request_ids, state FROM rounds ORDER BY round_id")]
    db.close()
    # all three (before and after the kill: nothing was decided), then the half holding "hard", which splits
    # again; the other halves run after it
    assert rounds == [(list(ids), "split"), (list(ids), "split"), (["hard", "easy-1"], "split"), (["hard"], "failed"),
                      (["easy-1"], "committed"), (["easy-2"], "committed")], rounds
    splits = [e for e in d.events() if e.get("event") == "round_split"]
    assert [e["requests"] for e in splits] == [3, 3, 2] and splits[0]["reason"].startswith("retention gate")


def test_refuses_to_start_when_the_registry_holds_a_round_the_ledger_never_recorded(tmp_path, mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    live = model_store.load_live(reg, "mnist-cnn")
    model_store.publish(reg, "mnist-cnn", live.model, live.session, arch=live.arch, input_shape=live.input_shape,
                        classes=live.classes, parent=1, dataset="mnist", round_id="r-000009")
    cfg = write_config(tmp_path / "u.toml", bootstrap="127.0.0.1:1", registry_dir=reg,
                       state_dir=tmp_path / "other-state")
    res = _run(cfg)
    assert res.returncode == 2, res.stderr
    assert "r-000009" in res.stderr and "unknown to the ledger" in res.stderr and "state.dir" in res.stderr


def test_refuses_to_start_without_a_model_or_with_a_bad_setting(tmp_path):
    cfg = write_config(tmp_path / "u.toml", bootstrap="127.0.0.1:1", registry_dir=tmp_path / "empty",
                       state_dir=tmp_path / "state")
    res = _run(cfg)
    assert res.returncode == 2 and "has no version" in res.stderr and "pretrain" in res.stderr

    cfg.write_text(cfg.read_text().replace("max_wait_s = 0.5", "max_wait_s = -1"))
    res = _run(cfg)
    assert res.returncode == 2 and "rounds.max_wait_s" in res.stderr
