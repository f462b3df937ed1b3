"""Exact rebases without a broker: content hashes, the ledger's schema 2, the training set, the configuration,
``unlearnd rebase``, and a rebase trained, re-applied, gated and committed on real MNIST (small slices, 1 epoch)."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from daemon import registry
from daemon.cli import main
from daemon.data.content import content_sha256, content_sha256_rows
from daemon.data.inline import encode_png
from daemon.data.mnist import load_mnist
from daemon.data.sources import TensorSource
from daemon.pipeline.codec import Limits, check_request, decode_inputs
from daemon.pipeline.commit import RoundCommitter
from daemon.pipeline.config import ConfigError, ModelSection, RebaseSection, RoundsSection, load_config
from daemon.pipeline.ledger import ForgottenContent, Ledger, LedgerError
from daemon.pipeline.rebase import Rebaser
from daemon.pipeline.rebase_set import build_training_set, snapshot_digest
from daemon.pipeline.receipts import ReceiptChain
from daemon.pipeline.runtime import ModelRuntime
from tests.pipeline_harness import copy_registry, pending_request, request

MODEL = "mnist-cnn"
SHAPE = (1, 28, 28)


# -- content hashes ---------------------------------------------------------------------------------------
def _decoded(body: dict, shape=SHAPE):
    sources = {"mnist-train": TensorSource(load_mnist().train_x, load_mnist().train_y)}
    from daemon.pipeline.model_spec import ModelSpec

    spec = ModelSpec(name=MODEL, input_shape=shape, num_classes=10, sources=sources)
    return decode_inputs(check_request(json.dumps(body).encode(), MODEL.encode(), {MODEL: spec}, Limits()))


def test_a_digit_sent_inline_as_png_and_by_ref_has_one_content_hash():
    digit = load_mnist().train_x[123]
    inline = {"schema": "unlearn.request/v1", "request_id": "png", "model": MODEL, "kind": "forget",
              "instances": [{"id": "a", "label": 7, "data": {"format": "png", "b64": encode_png(digit)}}]}
    by_ref = request("ref", refs=["mnist-train:123"])
    x_png = _decoded(inline).instances[0].x
    x_ref = _decoded(by_ref).instances[0].x
    assert not torch.equal(x_png, x_ref)            # PNG is 8-bit: the pixels differ slightly...
    assert content_sha256(x_png) == content_sha256(x_ref) == content_sha256(digit)     # ...the hash does not
    assert content_sha256(load_mnist().train_x[124]) != content_sha256(digit)
    assert content_sha256_rows(load_mnist().train_x[120:125])[3] == content_sha256(digit)


# -- the ledger ---------------------------------------------------------------------------------------------
def test_a_schema_1_ledger_is_migrated_on_open_and_a_newer_one_refused(tmp_path):
    path = tmp_path / "l.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE forgotten_content; DROP TABLE rebases; DROP TABLE exact; "
                     "UPDATE meta SET value='1' WHERE key='schema_version';")
    db.close()
    ledger = Ledger(path)
    assert ledger.content_seq(MODEL) == 0 and ledger.rebases() == []
    ledger.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
    db.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="ledger schema 4"):
        Ledger(path)


def test_rebase_requests_are_not_doubled_and_round_state_knows_rebase_ids(ledger_db):
    ledger = Ledger(ledger_db.target())
    first, new = ledger.request_rebase(MODEL, "on_demand")
    assert new and first == "rb-000001"
    assert ledger.request_rebase(MODEL, "every_deletions") == (first, False)
    assert ledger.round_state(first) == "requested"
    assert ledger.claim_rebase(first, "d1") and not ledger.claim_rebase(first, "d2")     # one daemon runs it
    assert ledger.rebases()[0]["owner"] == "d1" and ledger.round_state(first) == "running"
    with ledger.transaction() as tx:
        tx.end_rebase(first, "failed", reason="x")
    assert ledger.request_rebase(MODEL, "on_demand") == ("rb-000002", True)


# -- the training set ---------------------------------------------------------------------------------------
def _row(content: str, kind: str = "forget", label: int = 0, *, target=None, cls=None, rid="q") -> ForgottenContent:
    return ForgottenContent(content, "id-" + content[:6], rid, "r-000001", kind, label, target, cls)


def test_the_training_set_excludes_exactly_the_forgotten_instances_by_content_hash():
    m = load_mnist()
    source = TensorSource(m.train_x[:300], m.train_y[:300])
    hashes = content_sha256_rows(m.train_x[:300])
    forgotten = [_row(hashes[i]) for i in (3, 17, 42)]
    forgotten.append(_row(content_sha256(m.test_x[0])))                    # forgotten, never a training item
    forgotten.append(_row(hashes[5], "relabel", int(m.train_y[5]), target=(int(m.train_y[5]) + 1) % 10))
    class_items = [i for i in range(100, 200) if int(m.train_y[i]) == 9]
    forgotten.append(_row(hashes[class_items[0]], "forget_class", 9, cls=9))
    ts = build_training_set(source, "mnist-train:100-199", range(100, 200), SHAPE, forgotten)
    expected = [i for i in range(100, 200) if int(m.train_y[i]) != 9]      # the slice holds none of 3, 17, 42, 5
    assert ts.indices == expected and ts.excluded == 100 - len(expected) and ts.relabeled == 0

    ts = build_training_set(source, "mnist-train", range(300), SHAPE, forgotten)
    gone = {3, 17, 42} | {i for i in range(300) if int(m.train_y[i]) == 9}
    assert ts.indices == [i for i in range(300) if i not in gone]
    assert ts.excluded == len(gone) and ts.relabeled == 1 and ts.forgotten == len(forgotten)
    assert int(ts.labels[ts.indices.index(5)]) == (int(m.train_y[5]) + 1) % 10     # trained with its target
    assert [ts.status_of(r) for r in forgotten] == ["excluded"] * 3 + ["not_in_source", "relabeled", "excluded"]
    assert ts.digest == snapshot_digest(reversed(forgotten))        # order-free, checkable by anyone with the hashes
    kept = set(content_sha256_rows(m.train_x[ts.indices]))
    assert not kept & {hashes[i] for i in gone}


# -- configuration -------------------------------------------------------------------------------------------
def _config(tmp_path: Path, rebase: str, extra_env: dict | None = None):
    path = tmp_path / "u.toml"
    path.write_text(f'[[models]]\nname = "{MODEL}"\nprobe = "mnist-test:0-99"\n[models.rebase]\n{rebase}\n')
    return load_config(path, env=extra_env or {})


@pytest.mark.parametrize(("rebase", "setting", "message"), [
    ('source = "photos"', "models[0].rebase.source", "unknown source 'photos'"),
    ('source = "mnist-train:9-3"', "models[0].rebase.source", "end >= start"),
    ("every_deletions = 10", "models[0].rebase.every_deletions", "needs models[0].rebase.source"),
    ('source = "mnist-train"\nmemory_fill = 1.5', "models[0].rebase.memory_fill", "at most 1"),
    ('source = "mnist-train"\nepochs = 0', "models[0].rebase.epochs", ">= 1"),
    ('source = "mnist-train"\nprobe_margin = -0.1', "models[0].rebase.probe_margin", ">= 0"),
    ('source = "mnist-train"\nwhen = 3', "models[0].rebase.when", "unknown setting"),
])
def test_a_bad_rebase_setting_is_refused_naming_it(tmp_path, rebase, setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        _config(tmp_path, rebase)
    assert info.value.setting.startswith(setting)


def test_rebase_settings_load_from_the_file_and_the_environment(tmp_path):
    config = _config(tmp_path, 'source = "mnist-train:0-999"\nevery_deletions = 50',
                     {"UNLEARND_MODELS_0_REBASE_EPOCHS": "3", "UNLEARND_MODELS_0_REBASE_PROBE_MARGIN": "0.01"})
    assert config.models[0].rebase == RebaseSection(source="mnist-train:0-999", epochs=3, every_deletions=50,
                                                    probe_margin=0.01)
    assert not load_config(None, env={}).models[0].rebase.enabled()


# -- unlearnd rebase -----------------------------------------------------------------------------------------
def test_unlearnd_rebase_records_a_request_the_daemon_picks_up_and_refuses_what_cannot_be_rebased(tmp_path,
                                                                                                  capsys):
    cfg = tmp_path / "u.toml"
    cfg.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n'
                   f'[[models]]\nname = "{MODEL}"\nprobe = "mnist-test:0-99"\n[models.rebase]\nsource = "mnist-train"\n'
                   f'[[models]]\nname = "plain"\nprobe = "mnist-test:0-99"\n')
    assert main(["rebase", "--config", str(cfg), "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["rebase", "--config", str(cfg), "--model", "plain"]) == 2
    assert "models[1].rebase.source" in capsys.readouterr().err
    assert main(["rebase", "--config", str(cfg), "--model", MODEL]) == 0
    assert "rb-000001: rebase of mnist-cnn requested" in capsys.readouterr().out
    assert main(["rebase", "--config", str(cfg), "--model", MODEL]) == 0
    assert "already waiting or running" in capsys.readouterr().out
    ledger = Ledger(tmp_path / "state" / "ledger.sqlite")
    assert [(r["rebase_id"], r["state"], r["trigger"]) for r in ledger.rebases()] == [
        ("rb-000001", "requested", "on_demand")]
    assert Rebaser(ledger, tmp_path, ReceiptChain("d1", "r"), models_topic="m", owner="d1").requested(
        [MODEL]) == ("rb-000001", MODEL)


# -- a rebase on real MNIST, in process --------------------------------------------------------------------
@pytest.fixture()
def reg(tmp_path, mnist_registry):
    return copy_registry(mnist_registry, tmp_path / "registry")


def _runtime(reg, source: str = "mnist-train:0-1999", epochs: int = 1, max_drop: float = 0.5) -> ModelRuntime:
    section = ModelSection(name=MODEL, probe="mnist-test:0-499", rebase=RebaseSection(source=source, epochs=epochs))
    rt = ModelRuntime.open(section, reg, RoundsSection(retention_max_drop=max_drop))
    rt.ensure_model()
    return rt


_pending = pending_request


def _apply(rt, ledger, reg, rid: str, refs) -> int:
    committer = RoundCommitter(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models",
                               method={"name": "adv_imp"}, split_failed=False, keep_versions=0)
    round_id = ledger.allocate_round(MODEL, "d1", [rid])
    outcome = committer.run(rt, [_pending(rt, request(rid, refs=refs))], round_id, should_abort=lambda: False)
    assert outcome.status == "applied", outcome
    return outcome.version.version


def test_a_rebase_leaves_out_the_forgotten_re_applies_what_came_after_and_makes_the_rest_exact(reg, tmp_path):
    rt = _runtime(reg)
    ledger = Ledger(tmp_path / "l.sqlite")
    m = load_mnist()
    # before the snapshot: a ref, and the same kind of digit sent inline (found in the source by its hash)
    _apply(rt, ledger, reg, "before-ref", ["mnist-train:10"])
    inline = request("before-png", refs=[])
    inline["instances"] = [{"id": "u/png", "label": int(m.train_y[11]),
                            "data": {"format": "png", "b64": encode_png(m.train_x[11])}}]
    committer = RoundCommitter(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models",
                               method={"name": "adv_imp"}, split_failed=False, keep_versions=0)
    outcome = committer.run(rt, [_pending(rt, inline)], ledger.allocate_round(MODEL, "d1", ["before-png"]),
                            should_abort=lambda: False)
    assert outcome.status == "applied"
    _apply(rt, ledger, reg, "before-test", ["mnist-test:900"])     # not a training item
    rows = ledger.forgotten_content(MODEL)
    assert [r.content_sha256 for r in rows] == [content_sha256(m.train_x[10]), content_sha256(m.train_x[11]),
                                                content_sha256(m.test_x[900])]

    rebaser = Rebaser(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models", owner="d1")
    rebase_id, _ = ledger.request_rebase(MODEL, "on_demand")
    trained = rebaser.train(rt, rebase_id, threading.Event())
    job = ledger.rebases()[0]
    assert (job["state"], job["snapshot_seq"], job["forgotten"], job["excluded"]) == ("running", 3, 3, 2)
    assert job["digest"] == snapshot_digest(rows) and job["base_version"] == rt.version
    assert 10 not in trained.training.kept and 11 not in trained.training.kept
    assert len(trained.training.indices) == 1998 and trained.training.excluded == 2

    # while it trained, a round went on applying on the old lineage: caught up beside the rounds...
    _apply(rt, ledger, reg, "during", ["mnist-train:12", "mnist-train:13"])
    assert rebaser.catch_up(rt, trained, should_abort=lambda: False).reapplied == ["during"]
    assert trained.applied_seq == ledger.content_seq(MODEL) == 5
    # ...and more came before the finish: re-applied by it, after the first (a test digit needs nothing)
    _apply(rt, ledger, reg, "late-test", ["mnist-test:901"])
    during = _apply(rt, ledger, reg, "late", ["mnist-train:14"])
    outcome = rebaser.finish(rt, trained, should_abort=lambda: False)
    assert outcome.status == "committed", outcome.reason
    version = outcome.version.version
    assert version == during + 1 and registry.latest_version(reg, MODEL) == version
    manifest = registry.read_manifest(reg, MODEL, version)
    assert manifest["round_id"] == rebase_id and manifest["parent"] == during
    method = manifest["method"]
    assert method["name"] == "rebase" and method["base_version"] == during and method["excluded"] == 2
    assert method["reapplied"] == ["during", "late"] and method["snapshot_seq"] == 3 and method["forgotten"] == 3
    assert method["unseen"] == ["late-test"]           # not a training item: the rebased model never saw it
    # a fresh continual state: its original is the rebased weights, the two re-applied rounds in it
    assert rt.version == version and rt.live.session.rounds_applied == 2
    assert ledger.round_state(rebase_id) == "committed" and ledger.last_committed_version(MODEL) == version

    exact = [json.loads(r.value) for r in ledger.outbox() if r.topic == "receipts"
             and json.loads(r.value)["status"] == "exact"]
    assert sorted(r["request_id"] for r in exact) == ["before-png", "before-ref", "before-test"]
    by_id = {r["request_id"]: r for r in exact}
    assert [i["rebase"] for i in by_id["before-ref"]["instances"]] == ["excluded"]
    assert [i["rebase"] for i in by_id["before-test"]["instances"]] == ["not_in_source"]
    assert by_id["before-png"]["model_version"] == version and by_id["before-png"]["rebase_id"] == rebase_id
    assert by_id["before-png"]["rebase"]["excluded"] == 2
    count, problem = ledger.verify_audit()
    assert problem is None
    statuses = [s for _e, _r, s, *_ in ledger.audit_entries()]
    assert statuses.count("exact") == 3 and statuses.count("rebased") == 1
    rebased = next(json.loads(body) for _e, _r, status, body, *_ in ledger.audit_entries() if status == "rebased")
    assert rebased["reapplied"] == ["during", "late"] and rebased["unseen"] == ["late-test"]
    assert rebased["model_version"] == version and rebased["rebase"]["digest"] == method["digest"]
    event = json.loads(ledger.outbox()[-1].value)
    assert event["round_id"] == rebase_id and event["version"] == version

    # a second rebase does not repeat the exact receipts; "during" and "late" are now left out, hence exact
    second, _ = ledger.request_rebase(MODEL, "on_demand")
    outcome = rebaser.finish(rt, rebaser.prepare(rt, second, threading.Event()), should_abort=lambda: False)
    assert outcome.status == "committed" and outcome.exact == 3
    assert ledger.exact_requests(["before-ref", "during", "late", "late-test"]) == {
        "before-ref", "during", "late", "late-test"}


def test_a_rebase_that_fails_the_gate_is_recorded_failed_and_the_old_version_keeps_serving(reg, tmp_path):
    rt = _runtime(reg, source="mnist-train:0-63", max_drop=0.0)    # 64 digits, one epoch: far below the original
    ledger = Ledger(tmp_path / "l.sqlite")
    rebaser = Rebaser(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models", owner="d1")
    rebase_id, _ = ledger.request_rebase(MODEL, "on_demand")
    outcome = rebaser.finish(rt, rebaser.train(rt, rebase_id, threading.Event()), should_abort=lambda: False)
    assert outcome.status == "failed" and "retention gate" in outcome.reason
    assert registry.latest_version(reg, MODEL) == 1 and rt.version == 1
    assert ledger.rebases()[0]["state"] == "failed"
    assert [s for _e, _r, s, *_ in ledger.audit_entries()] == ["rebase_failed"]
    assert ledger.verify_audit()[1] is None


def test_a_policy_asks_for_a_rebase_only_once_something_new_was_forgotten(reg, tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    rebaser = Rebaser(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models", owner="d1")
    section = ModelSection(name=MODEL, probe="mnist-test:0-499",
                           rebase=RebaseSection(source="mnist-train", every_deletions=3))
    rt = ModelRuntime.open(section, reg, RoundsSection(retention_max_drop=0.5))
    rt.ensure_model()
    assert rebaser.due(rt) is None
    _apply(rt, ledger, reg, "p-1", ["mnist-train:20", "mnist-train:21"])
    assert rebaser.due(rt) is None                                      # 2 of 3
    _apply(rt, ledger, reg, "p-2", ["mnist-train:22"])
    assert rebaser.due(rt) == "every_deletions"
    rebase_id, _ = ledger.request_rebase(MODEL, "every_deletions")
    ledger.start_rebase(rebase_id, "d1", base_version=rt.version, snapshot_seq=ledger.content_seq(MODEL), forgotten=3,
                        excluded=3, digest="x")
    rebaser.fail(rebase_id, MODEL, "the test says so")
    assert rebaser.due(rt) is None                                      # nothing new since it ended
    # the other policies: the probe near the gate's floor, the memory filling
    near = dataclasses.replace(section, rebase=RebaseSection(source="mnist-train", probe_margin=0.6))
    _apply(rt, ledger, reg, "p-3", ["mnist-train:23"])
    full = dataclasses.replace(section, rebase=RebaseSection(source="mnist-train",
                                                             memory_fill=min(rt.live.session.memory.fill().values())))
    for policy, changed in (("probe_margin", near), ("memory_fill", full)):
        rt.section = changed
        assert rebaser.due(rt) == policy
    fill = rt.live.session.memory.fill()
    roomiest = min(fill.values())
    assert roomiest < max(fill.values())      # the roomiest layer counts: a full narrow layer says nothing alone
    rt.section = dataclasses.replace(section, rebase=RebaseSection(source="mnist-train", memory_fill=roomiest))
    assert rebaser.due(rt) == "memory_fill"
    rt.section = dataclasses.replace(section, rebase=RebaseSection(source="mnist-train",
                                                                   memory_fill=min(1.0, roomiest + 0.01)))
    assert rebaser.due(rt) is None
    rt.section = dataclasses.replace(section, rebase=RebaseSection(source="mnist-train", probe_margin=0.0001))
    assert rebaser.due(rt) is None            # the probe is far above the gate's floor (0.5 below the original)


def test_unlearnd_receipts_prints_an_exact_receipt():
    from daemon.pipeline.cli import _receipt_line

    line = _receipt_line({"request_id": "q", "status": "exact", "model": MODEL, "previous_version": 4,
                          "model_version": 7, "rebase_id": "rb-000001",
                          "instances": [{"id_sha256": "ab" * 32, "rebase": "excluded"}]})
    assert line == "q: exact  mnist-cnn v4 -> v7  rebase rb-000001  abababab excluded"


def test_a_rebase_version_unknown_to_the_ledger_is_refused_at_start_up(reg, tmp_path):
    from daemon.pipeline.commit import StartupError

    rt = _runtime(reg)
    ledger = Ledger(tmp_path / "l.sqlite")
    rebaser = Rebaser(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models", owner="d1")
    rebase_id, _ = ledger.request_rebase(MODEL, "on_demand")
    assert rebaser.finish(rt, rebaser.prepare(rt, rebase_id, threading.Event()),
                          should_abort=lambda: False).status == "committed"
    committer = RoundCommitter(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models",
                               method={"name": "adv_imp"}, split_failed=False, keep_versions=0)
    committer.check_consistency({MODEL: rt})        # the ledger knows it
    with pytest.raises(StartupError, match="comes from round rb-000001, unknown to the ledger"):
        RoundCommitter(  # a fresh state.dir on this registry
            Ledger(tmp_path / "other.sqlite"), reg, ReceiptChain("d1", "receipts"), models_topic="models",
            method={}, split_failed=False, keep_versions=0).check_consistency({MODEL: rt})


def test_relabel_and_class_rounds_are_re_applied_with_their_targets_and_class(reg, tmp_path):
    rt = _runtime(reg, source="mnist-train:0-1999")
    ledger = Ledger(tmp_path / "l.sqlite")
    m = load_mnist()
    rebaser = Rebaser(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models", owner="d1")
    # before the snapshot: a relabel, trained with its target by the rebase
    label = int(m.train_y[30])
    committer = RoundCommitter(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models",
                               method={"name": "adv_imp"}, split_failed=False, keep_versions=0)

    def run(body: dict) -> None:
        rid = body["request_id"]
        out = committer.run(rt, [_pending(rt, body)], ledger.allocate_round(MODEL, "d1", [rid]), lambda: False)
        assert out.status == "applied", out

    run(request("rl-1", "relabel", ["mnist-train:30"], labels=[label], targets=[(label + 1) % 10]))
    rebase_id, _ = ledger.request_rebase(MODEL, "on_demand")
    trained = rebaser.train(rt, rebase_id, threading.Event())
    assert trained.training.relabeled == 1 and 30 in trained.training.kept
    assert int(trained.training.labels[trained.training.indices.index(30)]) == (label + 1) % 10
    # after it: a relabel and a class round, re-applied on the rebased weights in that order
    label = int(m.train_y[31])
    run(request("rl-2", "relabel", ["mnist-train:31"], labels=[label], targets=[(label + 2) % 10]))
    fives = [i for i in range(2000, 2100) if int(m.train_y[i]) == 5][:3]     # examples outside the source:
    run(request("fc-5", "forget_class", [f"mnist-train:{i}" for i in fives], forget_class=5))  # its class's stand in
    outcome = rebaser.finish(rt, trained, should_abort=lambda: False)
    assert outcome.status == "committed", outcome.reason
    assert outcome.reapplied == ("rl-2", "fc-5")
    assert rt.forgotten_classes == frozenset({5})          # the class round's state carried into the rebase
    manifest = registry.read_manifest(reg, MODEL, outcome.version.version)
    assert manifest["metrics"]["forgotten_classes"] == [5]
    exact = {json.loads(r.value)["request_id"]: json.loads(r.value) for r in ledger.outbox()
             if r.topic == "receipts" and json.loads(r.value)["status"] == "exact"}
    assert list(exact) == ["rl-1"] and exact["rl-1"]["instances"][0]["rebase"] == "relabeled"


def test_a_relabel_of_an_instance_outside_the_training_source_refuses_the_rebase(reg, tmp_path):
    from daemon.pipeline.rebase import RebaseRefused

    rt = _runtime(reg, source="mnist-train:0-99")
    ledger = Ledger(tmp_path / "l.sqlite")
    label = int(load_mnist().train_y[500])
    committer = RoundCommitter(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models",
                               method={"name": "adv_imp"}, split_failed=False, keep_versions=0)
    body = request("rl-out", "relabel", ["mnist-train:500"], labels=[label], targets=[(label + 1) % 10])
    assert committer.run(rt, [_pending(rt, body)], ledger.allocate_round(MODEL, "d1", ["rl-out"]),
                         lambda: False).status == "applied"
    rebaser = Rebaser(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models", owner="d1")
    rebase_id, _ = ledger.request_rebase(MODEL, "on_demand")
    with pytest.raises(RebaseRefused, match="rl-out name instances that are not items of the training source"):
        rebaser.train(rt, rebase_id, threading.Event())


def test_a_publish_that_breaks_off_after_the_version_is_written_is_left_to_the_recovery_never_failed(
        reg, tmp_path, monkeypatch):
    """Not a stop (the ledger gone at the commit, a store refusing the version): the version is LATEST already, so
    failing the rebase would leave a version no receipt names; it stays committing and the restart rolls it forward."""
    from daemon.pipeline.rebase import RebaseCommitInterrupted

    rt = _runtime(reg)
    ledger = Ledger(tmp_path / "l.sqlite")
    _apply(rt, ledger, reg, "gone", ["mnist-train:10"])
    rebaser = Rebaser(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models", owner="d1")
    rebase_id, _ = ledger.request_rebase(MODEL, "on_demand")
    trained = rebaser.prepare(rt, rebase_id, threading.Event())

    def broken(*_args, **_kwargs):
        raise RuntimeError("the database went away at the commit")

    monkeypatch.setattr(rebaser, "_commit", broken)
    with pytest.raises(RebaseCommitInterrupted, match="the database went away"):
        rebaser.finish(rt, trained, should_abort=lambda: False)
    written = registry.latest_version(reg, MODEL)
    assert registry.read_manifest(reg, MODEL, written)["round_id"] == rebase_id
    assert ledger.rebases()[0]["state"] == "committing"
    assert [s for _e, _r, s, *_ in ledger.audit_entries() if s.startswith("rebase")] == []   # not failed
    restarted = Rebaser(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models", owner="d1")
    restarted.recover({MODEL: _runtime(reg)})
    assert ledger.rebases()[0]["state"] == "committed" and registry.latest_version(reg, MODEL) == written
    assert "rebased" in [s for _e, _r, s, *_ in ledger.audit_entries()]
