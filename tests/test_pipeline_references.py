"""The operator's reference models through the daemon's round (issue 22): loaded from [[models]] ``references``,
each instance judged by the models that did not train on it, the receipt saying which reference it used; a folder
that cannot be used stops the start-up with the setting named."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from daemon.engine.unseen import SCORE_MODELS
from daemon.pipeline.config import ConfigError, ModelSection, RoundsSection, load_config
from daemon.pipeline.references import ReferencesError, load_references
from daemon.pipeline.runtime import ModelRuntime, RuntimeError_
from tests.pipeline_harness import copy_registry, request
from tests.test_pipeline_unseen import MODEL, _apply, _body, _ranked

SCALE = 0.5      # a reference whose head is scaled down: less sure of every digit than the live model


@pytest.fixture()
def reg(tmp_path, mnist_registry):
    return copy_registry(mnist_registry, tmp_path / "registry")


def _live(reg) -> ModelRuntime:
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-499"), reg, RoundsSection())
    rt.ensure_model()
    return rt


def _state(model: torch.nn.Module, head_scale: float = 1.0) -> dict[str, torch.Tensor]:
    m = copy.deepcopy(model)
    head = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(head_scale)
        head.bias.mul_(head_scale)
    return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}


def _folder(path, model, scales=(1.0, 1.0), trained_on=None):
    path.mkdir(parents=True, exist_ok=True)
    for j, s in enumerate(scales):
        save_file(_state(model, s), str(path / f"ref-{j}.safetensors"))
        if trained_on is not None and trained_on[j] is not None:
            np.save(path / f"ref-{j}.idx.npy", np.asarray(trained_on[j], dtype=np.int64))
    return path


def _runtime(reg, folder, goal="unseen", source="mnist-train") -> ModelRuntime:
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-499", goal=goal, references=str(folder),
                                        references_source=source), reg, RoundsSection(retention_max_drop=0.5))
    rt.ensure_model()
    return rt


def test_a_reference_that_trained_on_an_instance_is_left_out_for_it(reg, tmp_path):
    live = _live(reg)
    refs = load_references(_folder(tmp_path / "refs", live.live.model, trained_on=[[3, 7], None]),
                           live.live.model, "mnist-train")
    x = live.splits.train_x[[3, 4]]
    y = live.splits.train_y[[3, 4]]
    s = refs.scores(x, y, ["mnist-train:3", "mnist-train:4"], live.sources)
    assert s.shape == (2, 2)
    assert math.isnan(s[0, 0]) and not math.isnan(s[0, 1])        # ref-0 saw digit 3
    assert bool(torch.isfinite(s[1]).all())                       # nobody saw digit 4
    inline = refs.scores(x, y, [None, "mnist-test:4"], live.sources)
    assert bool(torch.isfinite(inline).all())                     # unplaceable: compared with all of them
    every = load_references(_folder(tmp_path / "every", live.live.model, trained_on=[[3], [3]]),
                            live.live.model, "mnist-train")
    assert bool(torch.isfinite(every.scores(x[:1], y[:1], ["mnist-train:3"], live.sources)).all())


@pytest.mark.slow
def test_references_that_score_the_digits_as_the_model_does_leave_it_alone_and_the_receipt_says_models(reg, tmp_path):
    live = _live(reg)
    top = _ranked(live)[:4]
    rt = _runtime(reg, _folder(tmp_path / "refs", live.live.model))
    before = {n: p.detach().clone() for n, p in rt.live.model.named_parameters()}
    outcome, (receipt,) = _apply(rt, reg, tmp_path / "a", [_body("same", top, None)])
    assert outcome.status == "applied" and outcome.result.steps == 0
    assert all(torch.equal(before[n], p) for n, p in rt.live.model.named_parameters())
    m = receipt["membership"]
    assert m["reference"] == "models" and m["score"] == SCORE_MODELS and m["reference_size"] == 2
    assert m["stopped_by"] == "already_unseen" and m["auc"] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.slow
def test_references_less_sure_than_the_model_make_it_push_the_digits_down_to_them(reg, tmp_path):
    """The most member-like digits against references whose head is halved: under (the probe check would call
    some of them held-out); the round pushes them to the references' scores and stops there."""
    live = _live(reg)
    top = _ranked(live)[:4]
    rt = _runtime(reg, _folder(tmp_path / "refs", live.live.model, scales=(SCALE - 0.1, SCALE + 0.1)))
    outcome, (receipt,) = _apply(rt, reg, tmp_path / "b", [_body("down", top, "unseen")])
    m = receipt["membership"]
    assert outcome.status == "applied" and m["reference"] == "models"
    assert m["auc_before"] > 0.9 and m["stopped_by"] == "unseen" and m["steps"] > 0
    assert m["verdict"] == "indistinguishable" and m["auc"] <= 0.5 + m["margin"], m


def test_a_folder_that_cannot_be_used_stops_the_start_naming_the_setting(reg, tmp_path):
    live = _live(reg)
    with pytest.raises(RuntimeError_, match=r"models\.mnist-cnn\.references: .*no such folder"):
        _runtime(reg, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError_, match="no \\*.safetensors"):
        _runtime(reg, tmp_path / "empty")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file({"w": torch.zeros(2)}, str(wrong / "r.safetensors"))
    with pytest.raises(RuntimeError_, match=r"r\.safetensors: not a state dict of this model's architecture"):
        _runtime(reg, wrong)
    bad_idx = _folder(tmp_path / "bad-idx", live.live.model, scales=(1.0,))
    np.save(bad_idx / "ref-0.idx.npy", np.array([0.5, 1.5]))
    with pytest.raises(RuntimeError_, match="1-d array of integer indices"):
        _runtime(reg, bad_idx)
    backbone = tmp_path / "backbone"                             # the operator's own module's keys, as import takes
    backbone.mkdir()
    save_file({k: v.contiguous() for k, v in live.live.model[1].state_dict().items()}, str(backbone / "b.safetensors"))
    assert len(load_references(backbone, live.live.model).models) == 1
    no_source = _folder(tmp_path / "no-source", live.live.model, scales=(1.0,), trained_on=[[1]])
    with pytest.raises(ReferencesError, match="need references_source"):
        load_references(no_source, live.live.model, "")


def test_references_source_must_be_one_of_the_models_sources(tmp_path):
    env = {"UNLEARND_MODELS_0_REFERENCES": str(tmp_path), "UNLEARND_MODELS_0_REFERENCES_SOURCE": "mnist-train"}
    assert load_config(None, env=env).models[0].references_source == "mnist-train"
    with pytest.raises(ConfigError, match=r"models\[0\]\.references_source.*'photos'"):
        load_config(None, env=env | {"UNLEARND_MODELS_0_REFERENCES_SOURCE": "photos"})


def test_kinds_with_a_goal_of_their_own_get_no_reference_scores(reg, tmp_path):
    live = _live(reg)
    rt = _runtime(reg, _folder(tmp_path / "refs", live.live.model))
    body = request("r", "relabel", ["mnist-train:0"], targets=[int(rt.splits.train_y[0] + 1) % 10])
    outcome, (receipt,) = _apply(rt, reg, tmp_path / "c", [body])
    assert outcome.status == "applied" and "membership" not in receipt


def test_an_instance_every_reference_trained_on_is_shifted_by_the_rounds_in_out_gap():
    """LiRA's IN − OUT shift, pooled over the round's instances that have both: the all-IN instance's target is
    where models that never saw it would be, not where the ones that did are (which would stop the round early)."""
    from daemon.pipeline.references import out_of_sample

    scores = torch.tensor([[5.0, 1.0, 1.0], [6.0, 6.0, 6.0], [3.0, 3.0, 1.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    saw = torch.tensor([[True, False, False], [True, True, True], [True, True, False], [False, False, False]])
    out = out_of_sample(scores, saw)
    assert torch.isnan(out[0, 0]) and torch.equal(out[0, 1:], scores[0, 1:])
    assert torch.equal(out[1], scores[1] - 3.0)                   # gaps 4 and 2: pooled 3
    assert torch.isnan(out[2, :2]).all() and out[2, 2] == 1.0
    assert torch.equal(out[3], scores[3])                         # nobody saw it
    alone = out_of_sample(scores[1:2], saw[1:2])                  # nothing to measure the gap on: kept as is
    assert torch.equal(alone, scores[1:2])
