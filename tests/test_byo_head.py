"""The classifier head setting: declared at import (or in the daemon's config), recorded in the manifest,
kept by every later version, used by class rounds, and refused when it names no head or disagrees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from daemon import registry
from daemon.cli import main
from daemon.engine.config import preset
from daemon.engine.kinds import ForgetClass
from daemon.engine.models import load_factory
from daemon.engine.requests import ForgetRequest
from daemon.pipeline.config import ModelSection, RoundsSection
from daemon.pipeline.runtime import ModelRuntime, RuntimeError_
from daemon.registry import model_store

FACTORY = "tests.byo_factories:calibrated"
MODEL = "cal"


def _import(tmp_path: Path, *extra: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file(load_factory(FACTORY)().state_dict(), str(tmp_path / "w.safetensors"))
    reg = tmp_path / "reg"
    assert main(["import", "--registry", str(reg), "--model", MODEL, "--factory", FACTORY, "--weights",
                 str(tmp_path / "w.safetensors"), "--input-shape", "1,28,28", "--classes", "10", *extra]) == 0
    return reg


def test_import_records_the_declared_head_and_says_which_head_it_would_have_found(tmp_path, capsys):
    reg = _import(tmp_path, "--head", "head")
    out = capsys.readouterr().out
    assert "classifier head 'head' (declared)" in out
    manifest = registry.read_manifest(reg, MODEL, 1)
    assert manifest["head"] == "head"
    assert manifest["method"]["params"]["head_found"] == "calibrate"   # what finding it would have picked


def test_an_undeclared_head_is_found_and_named_at_import(tmp_path, capsys):
    reg = _import(tmp_path / "a")
    out = capsys.readouterr().out
    assert "classifier head 'calibrate' (found by output width; declare --head" in out
    assert registry.read_manifest(reg, MODEL, 1)["head"] is None


def test_later_versions_keep_the_head_and_class_rounds_move_only_its_row(tmp_path):
    reg = _import(tmp_path, "--head", "head")
    live = model_store.load_live(reg, MODEL)
    assert live.head == "head" and live.session.head == "1.head"
    before = {n: p.detach().clone() for n, p in live.model.named_parameters()}
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    pred = live.model(x).argmax(1)
    c = int(pred[0])
    request = ForgetRequest(ForgetClass.name, x[pred == c], pred[pred == c], forget_class=c)
    config = preset("default", "adv_imp", ForgetClass.name).with_overrides(max_steps=3)
    result, _ = live.session.run_round(request, method="adv_imp", config=config)
    changed = {n for n, p in live.model.named_parameters() if not torch.equal(p, before[n])}
    if result.succeeded:
        assert changed <= {"1.head.weight", "1.head.bias"} and changed, changed
    else:                                       # a failed round leaves the model: check what it produced
        state = result.state
        changed = {n for n in before if not torch.equal(state[n], before[n])}
        assert changed <= {"1.head.weight", "1.head.bias"} and changed, changed
    moved_rows = (live.session.model.get_submodule("1.head").weight - before["1.head.weight"]).abs().sum(1) > 0
    if result.succeeded:
        assert moved_rows.nonzero().flatten().tolist() == [c]
    v2 = model_store.publish(reg, MODEL, live.model, live.session, input_shape=live.input_shape,
                             classes=live.classes, parent=live.version, round_id="unlearn-1")
    assert v2.manifest["head"] == "head" and v2.manifest["factory"] == FACTORY
    assert model_store.load_live(reg, MODEL).session.head == "1.head"


def test_a_head_setting_that_disagrees_with_the_manifest_or_names_no_head_is_refused(tmp_path):
    reg = _import(tmp_path, "--head", "head")
    with pytest.raises(model_store.HeadError, match="differs from the head 'head'"):
        model_store.load_live(reg, MODEL, head="calibrate")
    assert model_store.load_live(reg, MODEL, head="head").head == "head"
    other = _import(tmp_path / "b")
    with pytest.raises(model_store.HeadError, match=r"modules that fit: \['head', 'calibrate'\]"):
        model_store.load_live(other, MODEL, head="body")
    assert model_store.load_live(other, MODEL, head="calibrate").session.head == "1.calibrate"


def test_the_daemon_takes_its_head_from_config_and_refuses_a_conflict_naming_the_setting(tmp_path):
    reg = _import(tmp_path, "--head", "head")
    ok = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-9", head="head"), reg, RoundsSection())
    ok.ensure_model()
    assert ok.live.session.head == "1.head"
    bad = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-9", head="calibrate"), reg,
                            RoundsSection())
    with pytest.raises(RuntimeError_, match=f"models.{MODEL}.head: .*differs"):
        bad.ensure_model()
    found = _import(tmp_path / "c")
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-9", head="head"), found, RoundsSection())
    rt.ensure_model()
    assert rt.live.head == "head" and rt.live.session.head == "1.head"


def test_unlearn_takes_head_on_the_command_line_and_records_it(tmp_path, capsys):
    reg = _import(tmp_path)                   # nothing declared at import
    rc = main(["unlearn", "--registry", str(reg), "--model", MODEL, "--dataset", "mnist", "--kind", "forget_class",
               "--class", "3", "--class-examples", "8", "--head", "head", "--set", "max_steps=2"])
    assert rc == 0, capsys.readouterr().err
    assert registry.read_manifest(reg, MODEL, 2)["head"] == "head"
    rc = main(["unlearn", "--registry", str(reg), "--model", MODEL, "--dataset", "mnist", "--kind", "forget_class",
               "--class", "3", "--head", "calibrate"])
    assert rc == 2 and "differs from the head 'head'" in capsys.readouterr().err
    fresh = _import(tmp_path / "d")
    capsys.readouterr()
    rc = main(["unlearn", "--registry", str(fresh), "--model", MODEL, "--dataset", "mnist", "--kind", "forget_class",
               "--class", "3", "--head", "no_such"])
    assert rc == 2 and "modules that fit: ['head', 'calibrate']" in capsys.readouterr().err
    assert registry.latest_version(fresh, MODEL) == 1


def test_a_model_s_own_engine_settings_apply_to_its_rounds_and_bad_ones_are_refused_at_start(tmp_path):
    from daemon.pipeline.config import ConfigError, load_config

    config = load_config(None, env={"UNLEARND_MODELS_0_SETTINGS": "lr=3e-5,anchor_deform=0"})
    assert config.models[0].round_settings() == {"lr": 3e-5, "anchor_deform": 0}
    for bad, reason in (("lr=fast", "lr must be a number"), ("nope=1", "unknown unlearning setting"),
                        ("lr", "KEY=VALUE")):
        with pytest.raises(ConfigError, match=reason) as err:
            load_config(None, env={"UNLEARND_MODELS_0_SETTINGS": bad})
        assert "models[0].settings" in str(err.value)
    reg = _import(tmp_path)
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-9", settings=["lr=1e-5", "max_steps=7"]),
                           reg, RoundsSection(held_impressions=4))
    forget = rt.round_config("forget")
    assert (forget.lr, forget.max_steps, forget.held_impressions) == (1e-5, 7, 4)
    plain = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-9"), reg, RoundsSection())
    assert plain.round_config("forget") == preset("default", "adv_imp", "forget")
