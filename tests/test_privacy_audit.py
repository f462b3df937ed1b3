"""``unlearnd audit membership`` (issue 22, part 2): the strong offline check an auditor runs on any version."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from daemon.cli import main
from daemon.privacy.audit import membership_audit
from tests.pipeline_harness import write_config


def _fit(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 400) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def memorised():
    """Random labels on random images: a model can only memorise them, so membership is all there is."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    members, outside = slice(0, 100), slice(100, 400)
    target = _fit(x[members], y[members], seed=1)
    references = [_fit(x[200:300], y[200:300], seed=s) for s in (2, 3)]    # trained without the members
    return x, y, members, outside, target, references


def test_memorised_instances_are_found_by_every_check_and_data_no_model_saw_is_not(memorised):
    x, y, members, outside, target, references = memorised
    held_x, held_y = x[300:400], y[300:400]                   # never seen by the target nor the references
    found = membership_audit(target, x[members], y[members], held_x, held_y, 4, references=references, reps=200)
    assert found["check"]["auc"] > 0.9 and found["verdict"] == "under"
    assert found["confidence"]["auc"] > 0.9 and found["confidence"]["tpr1"] > 0.3
    assert found["rmia"]["auc"] > 0.9 and found["verdict_rmia"] == "under" and found["rmia"]["references"] == 2
    unseen = membership_audit(target, x[100:200], y[100:200], held_x, held_y, 4, references=references, reps=200)
    lo, hi = unseen["check"]["auc_ci95"]
    assert lo < 0.5 < hi and abs(unseen["confidence"]["auc"] - 0.5) < 0.12
    assert abs(unseen["rmia"]["auc"] - 0.5) < 0.15
    assert unseen["instances"] == 100 and unseen["reference_size"] == 100


def test_without_reference_models_the_strong_attack_is_not_claimed(memorised):
    x, y, members, _outside, target, _refs = memorised
    out = membership_audit(target, x[members], y[members], x[300:400], y[300:400], 4, reps=50)
    assert out["rmia"] is None and "verdict_rmia" not in out
    with pytest.raises(ValueError, match="at least one instance"):
        membership_audit(target, x[:0], y[:0], x[300:400], y[300:400], 4)
    with pytest.raises(ValueError, match="2 held-out"):
        membership_audit(target, x[:4], y[:4], x[300:301], y[300:301], 4)


def test_the_cli_audits_a_published_version_by_refs_and_refuses_bad_input(tmp_path, mnist_registry, capsys):
    import shutil

    from daemon.registry import atomic_write_bytes, load_state_dict

    reg = tmp_path / "registry"
    shutil.copytree(mnist_registry, reg)
    cfg = write_config(tmp_path / "u.toml", bootstrap="127.0.0.1:9", registry_dir=reg, state_dir=tmp_path / "s",
                       probe="mnist-test:0-399")
    refs = tmp_path / "refs.txt"
    refs.write_text("# the requester's digits\nmnist-train:10\nmnist-train:11\n\nmnist-train:12\n")
    state, _ = load_state_dict(reg, "mnist-cnn")
    from safetensors.torch import save

    atomic_write_bytes(tmp_path / "ref.safetensors", save(state))     # a reference of the same architecture
    out = tmp_path / "audit.json"
    base = ["audit", "membership", "--config", str(cfg), "--model", "mnist-cnn"]
    assert main([*base, "--instances", str(refs), "--ref", "mnist-train:13", "--reference-weights",
                 str(tmp_path / "ref.safetensors"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "mnist-cnn" and result["version"] == 1 and result["instances"] == 4
    assert result["reference_size"] == 400 and result["check"]["verdict"] in ("under", "over", "indistinguishable")
    assert result["rmia"]["references"] == 1 and result["rmia"]["population"] == 200     # half the held-out data
    assert result["verdict_rmia"] in ("under", "over", "indistinguishable")
    printed = capsys.readouterr().out
    assert "mnist-cnn v1: 4 instance(s) against 400 held-out examples" in printed and "RMIA (offline" in printed
    assert main([*base, "--ref", "mnist-train:1", "--against", "mnist-test:400-499"]) == 0
    assert "the strong attack was not run" in capsys.readouterr().out
    for bad, words in ((["--ref", "mnist-train:99999999"], "ref_out_of_range"),
                       (["--ref", "nowhere:1"], "unknown_ref_source"),
                       ([], "needs instances"),
                       (["--ref", "mnist-train:1", "--version", "9"], "no version 9"),
                       (["--ref", "mnist-train:1", "--against", "mnist-test:5-5"], "at least 2 items"),
                       (["--ref", "mnist-train:1", "--reference-weights", str(refs)], "--reference-weights")):
        assert main([*base, *bad]) == 2, bad
        assert words in capsys.readouterr().err, bad
    assert main(["audit", "membership", "--config", str(cfg), "--model", "other", "--ref", "mnist-train:1"]) == 2
    assert main(["audit", "membership", "--model", "mnist-cnn", "--ref", "mnist-train:1"]) == 2
