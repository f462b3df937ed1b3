"""Start-up checks and the retention gate."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daemon import model_store, registry
from tests.service_harness import (
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
                       state_dir=tmp_path / "state", probe="mnist-train:0-99", retention_max_drop=0.02)
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
    assert registry.list_versions(reg, "mnist-cnn") == [1]


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
