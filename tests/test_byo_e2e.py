"""The whole bring-your-own-model path on a torchvision model nobody here wrote: a tiny VisionTransformer trained
outside the package, ``unlearnd import`` → ``unlearnd unlearn`` → ``unlearnd serve`` answering tritonclient with
the right shapes and the operator's class names (logits and Triton's classification extension)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from safetensors.torch import save_file

from daemon import registry
from daemon.cli import main
from daemon.data.mnist import load_mnist
from daemon.engine.models import load_factory
from daemon.registry import model_store
from tests.byo_training import train_operator_model
from tests.test_serve import Server

MODEL = "vit"
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FACTORY = "tests.byo_factories:tiny_vit"


def _train_vit() -> torch.nn.Module:
    """The operator's own training, outside unlearnd: their module, their loop, their weights file."""
    return train_operator_model(load_factory(FACTORY), steps=300)


@pytest.mark.slow
def test_import_unlearn_and_serve_a_torchvision_vit(tmp_path, capsys):
    reg = tmp_path / "reg"
    save_file(_train_vit().state_dict(), str(tmp_path / "vit.safetensors"))
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n")
    assert main(["import", "--registry", str(reg), "--model", MODEL, "--factory", FACTORY,
                 "--weights", str(tmp_path / "vit.safetensors"), "--input-shape", "1,28,28",
                 "--mean", "0.1307", "--std", "0.3081", "--classes", str(tmp_path / "classes.txt")]) == 0

    m = load_mnist()
    correct = [i for i in range(200) if int(model_store.load_live(reg, MODEL).model(m.train_x[i:i + 1]).argmax())
               == int(m.train_y[i])][:4]
    rc = main(["unlearn", "--registry", str(reg), "--model", MODEL, "--dataset", "mnist", "--method", "adv_imp",
               "--forget-indices", ",".join(map(str, correct))])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    v2 = registry.verify_version(reg, MODEL, 2)
    assert v2.manifest["factory"] == FACTORY and v2.manifest["round_id"].startswith("unlearn-")
    live = model_store.load_live(reg, MODEL)
    with torch.no_grad():
        assert bool((live.model(m.train_x[correct]).argmax(1) != m.train_y[correct]).all())

    x = m.test_x[:3].numpy()
    server = Server(reg, MODEL)
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        meta = client.get_model_metadata(MODEL)
        assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28] and meta["outputs"][0]["shape"] == [-1, 10]
        inp = triton.InferInput("INPUT__0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        logits = client.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("OUTPUT__0")])
        with torch.no_grad():
            expected = live.model(torch.from_numpy(x)).numpy()
        assert logits.as_numpy("OUTPUT__0").shape == (3, 10)
        np.testing.assert_allclose(logits.as_numpy("OUTPUT__0"), expected, rtol=1e-4, atol=1e-5)
        assert logits.get_response()["model_version"] == "2"
        for binary in (True, False):
            top = client.infer(MODEL, [inp], outputs=[
                triton.InferRequestedOutput("OUTPUT__0", binary_data=binary, class_count=3)]).as_numpy("OUTPUT__0")
            assert top.shape == (3, 3)
            for row, logit_row in zip(top, expected, strict=True):
                parts = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
                assert [int(i) for _, i, _ in parts] == np.argsort(-logit_row)[:3].tolist()
                assert [label for _, _, label in parts] == [NAMES[int(i)] for _, i, _ in parts]
                np.testing.assert_allclose([float(s) for s, _, _ in parts], np.sort(logit_row)[::-1][:3], atol=1e-5)
    finally:
        rc, log = server.stop()
    assert rc == 0, log
    assert (reg / MODEL / "labels.txt").read_text().split() == NAMES
