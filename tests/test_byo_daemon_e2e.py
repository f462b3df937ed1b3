"""The daemon on an operator's own classifier: a BatchNorm CNN from a factory unlearnd did not write, trained
outside it, ``unlearnd import``-ed with its head and class names, adopted by a daemon on an empty state dir,
and unlearned by a Kafka request naming items of the operator's image folder by path (real broker)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from daemon import registry
from daemon.cli import main
from daemon.data.mnist import load_mnist
from daemon.engine.models import load_factory
from tests.byo_training import train_operator_model
from tests.pipeline_harness import (
    DaemonProcess,
    folder_model_table,
    outcome_receipts,
    publish_refs,
    read_topic,
    write_config,
)

pytestmark = pytest.mark.slow
FACTORY = "tests.byo_factories:tiny_net"
MODEL = "digits-net"
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PER_CLASS = 10


def _train() -> torch.nn.Module:
    """The operator's own training loop: their module, their normalisation, their weights file."""
    return train_operator_model(lambda: load_factory(FACTORY)(width=8), steps=250)


def _folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/<name>/<nn>.png``: MNIST test digits as 8-bit PNGs, in class folders named as the classes."""
    m = load_mnist()
    xs, ys = [], []
    for digit, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for n, row in enumerate((m.test_y == digit).nonzero().flatten()[:PER_CLASS].tolist()):
            pixels = (m.test_x[row, 0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / name / f"{n:02d}.png")
            xs.append(torch.from_numpy(pixels.copy()).float().div(255)[None])
            ys.append(digit)
    return torch.stack(xs), torch.tensor(ys)


def test_the_daemon_unlearns_an_imported_model_from_folder_refs(tmp_path, broker):
    save_file(_train().state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n")
    reg = tmp_path / "registry"
    assert main(["import", "--registry", str(reg), "--model", MODEL, "--factory", FACTORY, "--factory-kwargs",
                 '{"width": 8}', "--weights", str(tmp_path / "w.safetensors"), "--input-shape", "1,28,28",
                 "--mean", "0.1307", "--std", "0.3081", "--classes", str(tmp_path / "classes.txt"),
                 "--head", "head"]) == 0
    root = tmp_path / "photos"
    x, y = _folder(root)
    ts1 = torch.jit.load(str(reg / MODEL / "1" / "model.pt"), map_location="cpu")
    with torch.no_grad():
        right = (ts1(x).argmax(1) == y).nonzero().flatten().tolist()
    assert len(right) >= 80, "the operator's model recognises its folder"
    picked = [right[0], right[-1]]                       # two digits it gets right, named by path
    refs = [f"photos:{NAMES[int(y[i])]}/{i % PER_CLASS:02d}.png" for i in picked]

    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                       state_dir=tmp_path / "state", models=())
    with cfg.open("a") as f:
        f.write(folder_model_table(MODEL, "photos", root, head="head"))
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        d.wait_assigned()
        published = publish_refs(broker.bootstrap, MODEL, "byo-folder", refs, [int(y[i]) for i in picked])
        assert published.returncode == 0, published.stderr
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=240,
                          until=lambda rs: bool(outcome_receipts(rs).get("byo-folder")))
        receipt = outcome_receipts(recs)["byo-folder"][0]
        assert receipt["status"] == "applied", (receipt.get("reason"), d.tail())
        assert d.terminate() == 0
    finally:
        d.kill()
    version = receipt["model_version"]
    assert version == 2                                  # adopted version 1 from import, published 2
    manifest = registry.verify_version(reg, MODEL, version).manifest
    assert manifest["factory"] == FACTORY and manifest["head"] == "head" and manifest["classes"] == NAMES
    ts2 = torch.jit.load(str(reg / MODEL / str(version) / "model.pt"), map_location="cpu")
    with torch.no_grad():
        assert (ts2(x[picked]).argmax(1) != y[picked]).all()
        assert (ts2(x).argmax(1) == y).float().mean() > 0.75
    # BatchNorm's running statistics are the imported ones: the round never updated them
    state1 = registry.load_state_dict(reg, MODEL, 1)[0]
    state2 = registry.load_state_dict(reg, MODEL, 2)[0]
    for key in [k for k in state1 if "running_" in k]:
        assert torch.equal(state1[key], state2[key]), key
