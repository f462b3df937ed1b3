"""The daemon end to end on a folder source: MNIST digits written as PNGs, a request naming folder items by
path (sent with ``unlearnd publish``) applied against a real broker, a ref out of the folder rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from daemon.data.mnist import load_mnist
from tests.pipeline_harness import (
    DaemonProcess,
    copy_registry,
    folder_model_table,
    outcome_receipts,
    produce_requests,
    publish_refs,
    read_topic,
    request,
    write_config,
)

pytestmark = pytest.mark.slow
PER_CLASS = 20


def _digits_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/<digit>/<nnnnn>.png``: the first 20 MNIST test images of each class, as 8-bit PNGs."""
    mnist = load_mnist()
    xs, ys = [], []
    for digit in range(10):
        rows = (mnist.test_y == digit).nonzero().flatten()[:PER_CLASS]
        (root / str(digit)).mkdir(parents=True)
        for n, row in enumerate(rows.tolist()):
            pixels = (mnist.test_x[row, 0] * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / str(digit) / f"{n:05d}.png")
            xs.append(torch.from_numpy(pixels.copy()).float().div(255)[None])
            ys.append(digit)
    return torch.stack(xs), torch.tensor(ys)


def test_a_request_naming_folder_items_by_path_is_applied(tmp_path, broker, mnist_registry):
    root = tmp_path / "digits"
    x, y = _digits_folder(root)
    (tmp_path / "secret").mkdir()
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    cfg = write_config(tmp_path / "u.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                       state_dir=tmp_path / "state", models=())
    with cfg.open("a") as f:
        f.write(folder_model_table("mnist-cnn", "digits", root))
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        d.wait_assigned()
        produce_requests(broker.bootstrap, [request("e2e-escape", refs=["digits:3/../../secret/x.png"])])
        refs = ["digits:3/00002.png", "digits:7/00005.png"]
        published = publish_refs(broker.bootstrap, "mnist-cnn", "e2e-folder", refs, [3, 7])
        assert published.returncode == 0, published.stderr
        recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=180,
                          until=lambda rs: len(outcome_receipts(rs)) >= 2)
        got = outcome_receipts(recs)
        assert got["e2e-escape"][0]["status"] == "rejected"
        assert got["e2e-escape"][0]["reason"] == "ref_outside_source"
        receipt = got["e2e-folder"][0]
        assert receipt["status"] == "applied", (receipt.get("reason"), d.tail())
        version = receipt["model_version"]
        ts = torch.jit.load(str(reg / "mnist-cnn" / str(version) / "model.pt"), map_location="cpu")
        forgotten = x[[3 * PER_CLASS + 2, 7 * PER_CLASS + 5]]
        with torch.no_grad():
            assert (ts(forgotten).argmax(1) != torch.tensor([3, 7])).all()
            kept = (ts(x).argmax(1) == y).float().mean()
        assert kept > 0.8, "the folder's other digits are still recognised"
        assert d.terminate() == 0
    finally:
        d.kill()
