"""The CIFAR-10 path end to end on a tiny folder in torchvision's format: load, unlearn a ResNet-18
with BatchNorm, publish, reload. (Full-size CIFAR training is far beyond a CPU test budget.)"""

from __future__ import annotations

import torch

from daemon import registry
from daemon.registry import model_store
from daemon.data.cifar import load_cifar10
from daemon.engine.config import PRESETS
from daemon.engine.models import build_model
from daemon.engine.requests import ForgetRequest
from daemon.engine.session import UnlearningSession
from tests.test_data import _write_cifar


def test_a_cifar_resnet_round_publishes_and_reloads(tmp_path):
    splits = load_cifar10(_write_cifar(tmp_path / "data", per_batch=4), expect_full=False)
    assert splits.input_shape == (3, 32, 32) and len(splits.classes) == 10
    mean, std = splits.mean_std()
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", num_classes=10, input_shape=(3, 32, 32), mean=mean, std=std).eval()
    with torch.no_grad():
        pred = model(splits.train_x[:4]).argmax(1)
    session = UnlearningSession(model, num_classes=10)
    tiny = PRESETS["default"].with_overrides(max_steps=3, adv_per_instance=2, pgd_iterations=3, adv_batch=8,
                                             bn_train=True)
    # label each instance with the model's own prediction: the forget kind's "label absent" case
    request = ForgetRequest("forget", splits.train_x[:4], pred)
    result, importance = session.run_round(request, method="adv_imp", config=tiny, commit=False)
    assert result.outcome in ("forgotten", "budget_exhausted", "collapsed")
    assert importance is not None and set(importance) == {n for n, _ in model.named_parameters()}
    assert any("running_mean" in k for k in result.state), "BatchNorm statistics travel with the weights"
    info = model_store.publish(tmp_path / "reg", "cifar", model, session, arch="cifar_resnet18",
                               input_shape=(3, 32, 32), classes=splits.classes, parent=None, dataset="cifar10")
    live = model_store.load_live(tmp_path / "reg", "cifar")
    assert live.arch == "cifar_resnet18" and live.version == info.version
    scripted, _ = registry.load_torchscript(tmp_path / "reg", "cifar")
    x = splits.test_x[:2]
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), live.model(x))
        torch.testing.assert_close(live.model(x), model(x))
