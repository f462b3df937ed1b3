"""A daemon on a fresh state.dir adopts a registry built by ``unlearnd import`` / ``unlearnd unlearn``, and still
refuses one that is ahead of its own ledger (real registry, a real ledger on each engine, no broker)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from daemon.cli import main
from daemon.engine.models import load_factory
from daemon.pipeline.codec import Limits, check_request, decode_inputs
from daemon.pipeline.commit import RoundCommitter, StartupError
from daemon.pipeline.config import ModelSection, RoundsSection
from daemon.pipeline.intake import fill_labels
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.pending import PendingRequest
from daemon.pipeline.receipts import ReceiptChain
from daemon.pipeline.runtime import ModelRuntime
from daemon.registry import model_store
from tests.pipeline_harness import request

MODEL = "mine"


@pytest.fixture()
def reg(tmp_path):
    """An imported classifier (version 1, no round) in a registry no daemon has seen."""
    torch.manual_seed(0)
    net = load_factory("tests.byo_factories:tiny_net")()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    assert main(["import", "--registry", str(tmp_path / "reg"), "--model", MODEL, "--factory",
                 "tests.byo_factories:tiny_net", "--weights", str(tmp_path / "w.safetensors"),
                 "--input-shape", "1,28,28", "--classes", "10"]) == 0
    return tmp_path / "reg"


def _offline_round(reg, round_id: str) -> int:
    """A version as ``unlearnd unlearn`` writes it: the parent's model, a round id no ledger allocated."""
    live = model_store.load_live(reg, MODEL)
    return model_store.publish(reg, MODEL, live.model, live.session, input_shape=live.input_shape,
                               classes=live.classes, parent=live.version, round_id=round_id).version


def _check(reg, ledger: Ledger) -> None:
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-9"), reg, RoundsSection())
    rt.ensure_model()
    committer = RoundCommitter(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models",
                               method={"name": "adv_imp"}, split_failed=True, keep_versions=0)
    committer.check_consistency({MODEL: rt})


@pytest.mark.parametrize("round_id", [None, "unlearn-18c5f3a2b10", "r-18c5f3a2b10"],
                         ids=["import", "unlearn", "unlearn-before-0.x"])
def test_a_fresh_ledger_adopts_a_registry_written_by_import_or_unlearn(reg, tmp_path, round_id):
    if round_id is not None:
        _offline_round(reg, round_id)
    _check(reg, Ledger(tmp_path / "fresh.sqlite"))


def test_a_daemon_round_the_ledger_never_recorded_is_still_refused(reg, ledger_db):
    _offline_round(reg, "r-000009")
    setting = "state.dir" if ledger_db.engine == "sqlite" else "state.url"
    with pytest.raises(StartupError, match=rf"r-000009, unknown to the ledger at .* is {setting} the one"):
        _check(reg, Ledger(ledger_db.target("fresh")))


def test_an_offline_round_on_top_of_what_the_ledger_committed_is_refused(reg, ledger_db):
    ledger = Ledger(ledger_db.target())
    daemon_round = ledger.allocate_round(MODEL, "d1", [])
    version = _offline_round(reg, daemon_round)                     # as the daemon commits it
    with ledger.transaction() as tx:
        tx.end_round(daemon_round, "committed", version=version)
    _check(reg, ledger)                                             # registry and ledger agree
    _offline_round(reg, "unlearn-18c5f3a2b10")
    with pytest.raises(StartupError, match="ahead of its ledger.*rollback"):
        _check(reg, ledger)


def test_after_adoption_a_daemon_round_publishes_the_next_version_from_the_imported_factory(reg, ledger_db):
    """A whole round's commit (committing, the registry, committed with receipts and forgotten content) on either
    engine."""
    ledger = Ledger(ledger_db.target("fresh"))
    _check(reg, ledger)
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-99"), reg,
                           RoundsSection(retention_max_drop=1.0))
    rt.ensure_model()
    body = json.dumps(request("a", refs=["mnist-train:7"], model=MODEL)).encode()
    decoded = decode_inputs(check_request(body, MODEL.encode(), {MODEL: rt.spec}, Limits()))
    labels, targets = fill_labels(decoded, rt.predict_at_intake)
    pending = PendingRequest(decoded=decoded, topic="t", partition=0, offset=0, received_at=time.time(),
                             labels=labels, targets=targets)
    committer = RoundCommitter(ledger, reg, ReceiptChain("d1", "receipts"), models_topic="models",
                               method={"name": "adv_imp", "preset": "default"}, split_failed=False, keep_versions=0)
    round_id = ledger.allocate_round(MODEL, "d1", ["a"])
    outcome = committer.run(rt, [pending], round_id, should_abort=lambda: False)
    assert outcome.status == "applied" and outcome.version.version == 2
    manifest = outcome.version.manifest
    assert manifest["factory"] == "tests.byo_factories:tiny_net" and manifest["round_id"] == round_id
    assert ledger.last_committed_version(MODEL) == 2
    assert [c.request_id for c in ledger.forgotten_content(MODEL)] == ["a"] and ledger.verify_audit() == (1, None)
    assert isinstance(model_store.load_live(reg, MODEL).model[1], load_factory("tests.byo_factories:TinyNet"))
