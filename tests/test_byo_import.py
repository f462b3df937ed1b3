"""``unlearnd import``: an operator's own classifier (factory + weights) as version 1, rebuilt from its manifest
anywhere, and every bad input refused with exit 2, its reason, and the registry untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from daemon import registry
from daemon.cli import main
from daemon.engine.models import BUILTIN_FACTORIES, Normalize, build_model, load_factory
from daemon.registry import model_store

# through load_factory, as unlearnd does: the module's own `import torchvision` needs the shim first
TinyNet = load_factory("tests.byo_factories:TinyNet")

ROOT = Path(__file__).resolve().parents[1]
NET = "tests.byo_factories:tiny_net"
MEAN, STD = "0.5", "0.25"


def _save(tmp_path: Path, module: torch.nn.Module, name: str = "w.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def _import(reg: Path, weights: Path, *extra: str, factory: str = NET, classes: str = "10",
            shape: str = "1,28,28", model: str = "mine") -> int:
    return main(["import", "--registry", str(reg), "--model", model, "--factory", factory, "--weights", str(weights),
                 "--input-shape", shape, "--classes", classes, "--mean", MEAN, "--std", STD, *extra])


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    module = TinyNet()
    with torch.no_grad():   # BatchNorm statistics that are not the defaults, so a lost buffer shows
        module.body[1].running_mean.uniform_(-0.1, 0.1)
        module.body[1].running_var.uniform_(0.5, 1.5)
    return module.eval()


def test_import_round_trips_to_identical_logits_with_labels_for_triton(tmp_path, net):
    reg = tmp_path / "reg"
    names = tmp_path / "classes.txt"
    names.write_text("".join(f"digit {i}\n" for i in range(10)))
    assert _import(reg, _save(tmp_path, net), classes=str(names)) == 0
    live = model_store.load_live(reg, "mine")
    m = live.info.manifest
    assert live.version == 1 and m["parent"] is None and m["round_id"] is None
    assert m["factory"] == NET and m["factory_kwargs"] == {} and m["input_shape"] == [1, 28, 28]
    assert m["mean"] == [0.5] and m["std"] == [0.25] and m["classes"] == [f"digit {i}" for i in range(10)]
    assert m["arch"] == "tiny_net" and m["method"]["name"] == "import"
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        expected = net((x - 0.5) / 0.25)
        assert torch.equal(live.model(x), expected)
        scripted, _ = registry.load_torchscript(reg, "mine", 1)
        assert torch.allclose(scripted(x), expected, atol=1e-6)
    assert (reg / "mine" / "labels.txt").read_text().splitlines() == m["classes"]
    assert 'label_filename: "labels.txt"' in (reg / "mine" / "config.pbtxt").read_text()
    assert live.session.rounds_applied == 0


def test_a_torch_saved_state_dict_imports_too(tmp_path, net):
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    assert _import(tmp_path / "reg", weights, "--factory-kwargs", '{"width": 4}') == 0
    assert registry.read_manifest(tmp_path / "reg", "mine", 1)["factory_kwargs"] == {"width": 4}


def test_a_version_is_rebuilt_from_its_manifest_in_a_fresh_process_even_when_its_factory_imports_torchvision(
        tmp_path):
    torch.manual_seed(1)
    vit = load_factory("tests.byo_factories:tiny_vit")().eval()
    reg = tmp_path / "reg"
    assert _import(reg, _save(tmp_path, vit), factory="tests.byo_factories:tiny_vit") == 0
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    torch.save(x, tmp_path / "x.pt")
    # a fresh interpreter where nothing imported torchvision: the factory module's own `import torchvision`
    # works only because load_factory runs the shim before importing it
    code = ("import sys, torch\nfrom daemon.registry import model_store\n"
            "assert 'torchvision' not in sys.modules\n"
            f"live = model_store.load_live({str(reg)!r}, 'mine')\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            "with torch.no_grad():\n    print(live.model(x).tolist())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    with torch.no_grad():
        expected = vit((x - 0.5) / 0.25)
    assert torch.equal(torch.tensor(json.loads(res.stdout.strip().splitlines()[-1])), expected)


def test_a_version_written_before_factories_loads_through_its_builtin_arch(tmp_path):
    model = build_model("mnist_cnn", num_classes=10, input_shape=(1, 28, 28), mean=[0.1], std=[0.3]).eval()
    registry.write_version(tmp_path, "old", model, input_shape=(1, 28, 28), classes=[str(i) for i in range(10)],
                           parent=None, extra_manifest={"arch": "mnist_cnn", "dataset": "mnist"})
    live = model_store.load_live(tmp_path, "old")
    assert live.arch == "mnist_cnn" and live.factory.ref == BUILTIN_FACTORIES["mnist_cnn"]
    assert live.factory.kwargs == {"num_classes": 10, "input_shape": [1, 28, 28]}
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(live.model(x), model(x))
    # the next version inherits its parent's factory
    info = model_store.publish(tmp_path, "old", live.model, live.session, input_shape=live.input_shape,
                               classes=live.classes, parent=1)
    assert info.manifest["factory"] == BUILTIN_FACTORIES["mnist_cnn"] and info.manifest["arch"] == "mnist_cnn"
    assert isinstance(model_store.load_live(tmp_path, "old").model[0], Normalize)


# -- bad input: exit 2, the reason, nothing written ----------------------------------------------------
def _weights(tmp_path: Path, kind: str, net: torch.nn.Module) -> Path:
    state = {k: v.clone() for k, v in net.state_dict().items()}
    if kind == "missing":
        del state["head.bias"]
    elif kind == "unexpected":
        state["extra.weight"] = torch.zeros(3)
    elif kind == "wide":
        return _save(tmp_path, TinyNet(num_classes=11))
    elif kind == "text":
        (tmp_path / "w.bin").write_text("not weights at all")
        return tmp_path / "w.bin"
    elif kind == "module-pickle":
        torch.save(net, tmp_path / "w.pt")
        return tmp_path / "w.pt"
    elif kind == "list":
        torch.save([torch.zeros(2)], tmp_path / "w.pt")
        return tmp_path / "w.pt"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    return tmp_path / "w.safetensors"


BAD = [
    ({"factory": "tests.no_such_module:f"}, "ok", "does not import"),
    ({"factory": "tests.byo_factories:nope"}, "ok", "has no attribute 'nope'"),
    ({"factory": "tests.byo_factories:NOT_CALLABLE"}, "ok", "not callable"),
    ({"factory": "tests.byo_factories"}, "ok", "pkg.module:callable"),
    ({"factory": "tests.byo_factories:returns_a_dict"}, "ok", "not a torch.nn.Module"),
    ({"factory": "tests.byo_factories:raises"}, "ok", "the factory itself is broken"),
    ({}, "missing", "missing 1: head.bias"),
    ({}, "unexpected", "unexpected 1: extra.weight"),
    ({"extra": ["--factory-kwargs", '{"width": 8}']}, "ok", "shape mismatch"),
    ({"extra": ["--factory-kwargs", "[1]"]}, "ok", "JSON object"),
    ({"shape": "3,28,28", "extra": ["--mean", "0,0,0", "--std", "1,1,1"]}, "ok",
     "rejects inputs of --input-shape 3,28,28"),
    ({"shape": "3,28,28"}, "ok", "--mean/--std give 1 values for 3 input channels"),
    ({"factory": "tests.byo_factories:wrong_width"}, "wide", "not logits [N, 10]"),
    ({"factory": "tests.byo_factories:nan_output"}, "nan", "non-finite"),
    ({}, "text", "neither a safetensors file nor a torch.save'd state dict"),
    ({}, "module-pickle", "weights_only"),
    ({}, "list", "not a state dict"),
    ({"classes": "1"}, "ok", "at least 2 classes"),
    ({"classes": "no-such-file.txt"}, "ok", "neither an integer nor a readable"),
    ({"shape": "1,28"}, "ok", "C,H,W"),
    ({"extra": ["--head", "no.such.layer"]}, "ok", "modules that fit: ['head']"),
    ({"extra": ["--head", "body.0"]}, "ok", "the classifier head 'body.0' is not an nn.Linear with 10 outputs"),
]


@pytest.mark.parametrize(("args", "weights", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_input_exits_2_with_its_reason_and_writes_nothing(tmp_path, net, capsys, args, weights, message):
    reg = tmp_path / "reg"
    assert _import(reg, _save(tmp_path, net), model="other") == 0     # a registry with something in it
    before = _snapshot(reg)
    if weights == "nan":
        path = _save(tmp_path, load_factory("tests.byo_factories:nan_output")(), "nan.safetensors")
    else:
        path = _weights(tmp_path, weights, net)
    capsys.readouterr()
    rc = _import(reg, path, *args.get("extra", []), **{k: v for k, v in args.items() if k != "extra"})
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert _snapshot(reg) == before
    assert not (reg / "mine").exists()


def test_importing_over_an_existing_model_is_refused(tmp_path, net, capsys):
    reg = tmp_path / "reg"
    weights = _save(tmp_path, net)
    assert _import(reg, weights) == 0
    before = _snapshot(reg)
    assert _import(reg, weights) == 2
    assert "already exists" in capsys.readouterr().err
    assert _snapshot(reg) == before


def test_a_rollback_of_an_imported_model_is_rebuilt_from_the_same_factory(tmp_path, net):
    from daemon.registry import ops

    reg = tmp_path / "reg"
    assert _import(reg, _save(tmp_path, net)) == 0
    live = model_store.load_live(reg, "mine")
    with torch.no_grad():
        live.model[1].head.bias.add_(1.0)
    model_store.publish(reg, "mine", live.model, live.session, input_shape=live.input_shape, classes=live.classes,
                        parent=1, round_id="unlearn-1")
    info = ops.rollback(reg, "mine", 1)
    assert info.version == 3 and info.manifest["factory"] == NET and info.manifest["mean"] == [0.5]
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model_store.load_live(reg, "mine").model(x), net((x - 0.5) / 0.25))


def test_the_command_imports_a_torchvision_factory_in_a_fresh_process_and_exits_2_on_a_bad_one(tmp_path):
    torch.manual_seed(3)
    weights = _save(tmp_path, load_factory("tests.byo_factories:tiny_vit")())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(factory: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "daemon.cli", "import", "--registry", str(tmp_path / "reg"),
                               "--model", "vit", "--factory", factory, "--weights", str(weights),
                               "--input-shape", "1,28,28", "--classes", "10"],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)

    bad = run("tests.byo_factories:tiny_net")
    assert bad.returncode == 2 and "do not match the module of tests.byo_factories:tiny_net" in bad.stderr
    assert not (tmp_path / "reg" / "vit").exists()
    good = run("tests.byo_factories:tiny_vit")
    assert good.returncode == 0, good.stderr
    assert "vit v1" in good.stdout
