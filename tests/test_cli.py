"""The command line on real MNIST: a round end to end, and every bad input rejected with exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from daemon import registry
from daemon.bench.evaluation import ROW_FIELDS
from daemon.cli import main
from daemon.data.mnist import load_mnist
from tests.conftest import E2E_MODEL


@pytest.fixture()
def reg(mnist_registry: Path, tmp_path: Path) -> Path:
    """A private copy of the pretrained registry, so tests can publish without disturbing each other."""
    dst = tmp_path / "registry"
    shutil.copytree(mnist_registry, dst)
    return dst


def _unlearn(reg: Path, *extra: str) -> int:
    return main(["unlearn", "--registry", str(reg), "--model", E2E_MODEL, "--dataset", "mnist", *extra])


def test_a_round_publishes_a_version_whose_torchscript_alone_misclassifies_the_instances(reg, tmp_path):
    row_file = tmp_path / "row.json"
    rc = _unlearn(reg, "--forget-indices", "0,1,2,3,4,5,6,7", "--method", "adv_imp", "--json", str(row_file))
    assert rc == 0
    assert registry.latest_version(reg, E2E_MODEL) == 2
    info = registry.verify_version(reg, E2E_MODEL, 2)
    assert info.manifest["parent"] == 1
    assert info.manifest["method"]["name"] == "adv_imp"
    assert info.manifest["deletions_since_base"] == 8          # the pretrained base's 0 plus this round's 8
    scripted, _ = registry.load_torchscript(reg, E2E_MODEL, 2)
    m = load_mnist()
    with torch.no_grad():
        pred = scripted(m.train_x[:8]).argmax(1)
    assert bool((pred != m.train_y[:8]).all())
    row = json.loads(row_file.read_text())
    assert set(ROW_FIELDS) <= set(row)
    assert row["outcome"] == "forgotten" and row["acc_forget"] == 0.0
    assert row["acc_test"] > 0.5, "the published model must not have collapsed"


def test_a_baseline_round_runs_at_its_own_step_size_unless_the_operator_sets_one(reg):
    assert _unlearn(reg, "--forget-indices", "0,1,2,3", "--method", "neggrad") == 0
    params = registry.verify_version(reg, E2E_MODEL, 2).manifest["method"]["params"]
    assert params["lr"] == 1e-5
    assert _unlearn(reg, "--forget-indices", "4,5,6,7", "--method", "neggrad", "--set", "lr=2e-4") == 0
    assert registry.verify_version(reg, E2E_MODEL, 3).manifest["method"]["params"]["lr"] == 2e-4


def test_a_relabel_round_moves_each_instance_to_its_target(reg):
    m = load_mnist()
    labels = m.train_y[10:13].tolist()
    targets = [(y + 1) % 10 for y in labels]
    rc = _unlearn(reg, "--kind", "relabel", "--forget-indices", "10,11,12", "--targets", ",".join(map(str, targets)))
    assert rc == 0
    scripted, _ = registry.load_torchscript(reg, E2E_MODEL)
    with torch.no_grad():
        assert scripted(m.train_x[10:13]).argmax(1).tolist() == targets


def test_a_round_that_runs_out_of_steps_exits_1_and_publishes_nothing(reg, capsys):
    rc = _unlearn(reg, "--forget-indices", "0,1,2,3", "--method", "adv_imp", "--set", "max_steps=1",
                  "--set", "forget_boost=1.0")
    assert rc == 1
    assert "budget_exhausted" in capsys.readouterr().err
    assert registry.latest_version(reg, E2E_MODEL) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--forget-indices", "1,2", "--method", "nope"], "unknown method 'nope'"),
    (["--forget-indices", "1,2", "--method", "retrain"], "benchmark oracle"),
    (["--forget-indices", "60000"], "out of range"),
    (["--forget-indices", "-1"], "out of range"),
    (["--forget-indices", ""], "forget set is empty"),
    (["--forget-indices", "1,x"], "comma-separated integers"),
    (["--forget-indices", "3,3"], "duplicates"),
    (["--forget-indices", "1,2", "--kind", "relabel"], "one --targets entry per instance"),
    (["--forget-indices", "0", "--kind", "relabel", "--targets", "5"], "must differ"),
    (["--forget-indices", "0", "--kind", "relabel", "--targets", "10"], r"must lie in \[0, 9\]"),
    (["--forget-indices", "0", "--targets", "1"], "only for --kind relabel"),
    (["--kind", "forget_class"], "needs --class"),
    (["--kind", "forget_class", "--class", "12"], r"--class must lie in \[0, 9\]"),
    (["--kind", "forget_class", "--class", "3", "--forget-indices", "0"], "examples of class 3"),
    (["--forget-indices", "1", "--preset", "nope"], "unknown preset"),
    (["--forget-indices", "1", "--set", "learning_rate=1"], "unknown unlearning setting"),
    (["--forget-indices", "1", "--set", "lr=-1"], "lr must be > 0"),
    (["--forget-indices", "1", "--set", "lr"], "key=value"),
    (["--forget-indices", "1", "--dataset", "cifar10"], "data"),
    (["--forget-indices", "1", "--device", "tpu"], "--device"),
])
def test_bad_input_exits_2_with_the_reason(reg, capsys, args, message):
    assert _unlearn(reg, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("unlearnd unlearn:")
    import re
    assert re.search(message, err), err
    assert registry.latest_version(reg, E2E_MODEL) == 1


def test_an_unknown_model_exits_2(reg, capsys):
    rc = main(["unlearn", "--registry", str(reg), "--model", "nope", "--forget-indices", "1"])
    assert rc == 2
    assert "cannot load nope" in capsys.readouterr().err


def test_usage_errors_from_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["unlearn", "--kind", "bogus"])
    assert exc.value.code == 2


def test_bench_rejects_a_bad_plan_with_exit_2(tmp_path, capsys):
    assert main(["bench", "--methods", "neggrad,nope", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "--continual", "ten", "--out", str(tmp_path)]) == 2
    assert "ROUNDSxK" in capsys.readouterr().err
    # a bad --set value is refused before any data is loaded or any row runs
    assert main(["bench", "--set", "stop=bogus", "--out", str(tmp_path)]) == 2
    assert "stop must be one of zero, calibrated, unseen, got 'bogus'" in capsys.readouterr().err
    assert main(["bench", "--set", "lr=fast", "--out", str(tmp_path)]) == 2
    assert "lr must be a number, got 'fast'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_label_smoothing_outside_zero_to_one_exits_2_before_any_work(tmp_path, capsys):
    for value in ("1.0", "-0.1"):
        rc = main(["pretrain", "--dataset", "mnist", "--registry", str(tmp_path), "--model", "m",
                   "--label-smoothing", value])
        assert rc == 2
        assert "label_smoothing must lie in [0, 1)" in capsys.readouterr().err
        assert main(["bench", "--label-smoothing", value, "--out", str(tmp_path)]) == 2
        assert "label_smoothing must lie in [0, 1)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
