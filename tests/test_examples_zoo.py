"""The user's side of issue 20: ``examples/mnist_zoo`` builds and trains as a package outside unlearnd.

Everything runs in fresh subprocesses, as ``unlearnd import`` will: ``examples/`` on ``sys.path``,
unlearnd's torchvision shim first, then ``importlib.import_module("mnist_zoo.models")``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

_BUILD_ALL = r"""
import importlib, json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
assert "torchvision" not in sys.modules
from daemon._torchvision import import_torchvision
import_torchvision()
module = importlib.import_module("mnist_zoo.models")
out = {}
for name in ("resnet18", "mobilenet_v3_small", "vit_tiny"):
    factory = getattr(module, name)
    net = factory(**json.loads(sys.argv[2])).eval()
    with torch.no_grad():
        y = net(torch.rand(2, 1, 28, 28))
    out[name] = {"shape": list(y.shape), "finite": bool(torch.isfinite(y).all()),
                 "module": isinstance(net, torch.nn.Module)}
print(json.dumps(out))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(EXAMPLES)])
    return env


def test_each_factory_builds_a_10_class_module_in_a_fresh_process() -> None:
    proc = subprocess.run([sys.executable, "-c", _BUILD_ALL, str(EXAMPLES), '{"num_classes": 10}'],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(built) == {"resnet18", "mobilenet_v3_small", "vit_tiny"}
    for name, seen in built.items():
        assert seen == {"shape": [2, 10], "finite": True, "module": True}, name


def test_train_writes_weights_classes_and_import_arguments(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_zoo.train", "--arch", "vit_tiny", "--steps", "2", "--test-limit", "64",
         "--threads", "1", "--out", str(out), "--registry", str(tmp_path / "reg")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "vit_tiny.json").read_text())
    assert record["factory"] == "mnist_zoo.models:vit_tiny"
    assert record["factory_kwargs"]["num_classes"] == 10
    assert record["input_shape"] == [1, 28, 28]
    assert len(record["mean"]) == len(record["std"]) == 1 and 0.1 < record["mean"][0] < 0.2
    assert record["train"]["steps"] == 2 and 0.0 <= record["test_accuracy"] <= 1.0
    assert (out / "classes.txt").read_text().split() == [str(d) for d in range(10)]
    state = load_file(str(out / "vit_tiny.safetensors"))
    assert "conv_proj.weight" in state and not any(k.startswith(("0.", "1.")) for k in state)  # backbone only
    assert record["import_command"] in proc.stdout
    assert record["import_command"].startswith("PYTHONPATH=examples unlearnd import --registry ")
    assert "--factory mnist_zoo.models:vit_tiny" in record["import_command"]
    # the trainer's normalisation is the one unlearnd computes for MNIST
    from daemon.data.mnist import load_mnist

    mean, std = load_mnist().mean_std()
    assert record["mean"] == list(mean) and record["std"] == list(std)


def test_train_refuses_bad_kwargs_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_zoo.train", "--arch", "vit_tiny", "--kwargs", "{not json", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
    assert proc.returncode == 2
    assert "--kwargs is not JSON" in proc.stderr
    assert not out.exists()
