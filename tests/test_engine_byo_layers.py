"""Classifiers the engine did not write: BatchNorm, grouped / depthwise / dilated convs, LayerNorm,
attention, and a head that is not the last Linear (issue 20, item 3). Tiny modules, seconds each."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from daemon._torchvision import import_torchvision
from daemon.engine.config import UnlearnConfig, preset
from daemon.engine.heads import find_head, output_layer
from daemon.engine.importance_plugin import ImportancePlugin
from daemon.engine.methods import get_method
from daemon.engine.models import Normalize
from daemon.engine.protection import protection_report, unprotected_update_share
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import OUTCOMES, _forget_set_collapsed, _top_share, run_round
from daemon.engine.session import UnlearningSession
from daemon.engine.subspace import SubspaceMemory, _UpdateProjector, layer_input_covariances, protectable_layers
from daemon.engine.training import TrainConfig, train_classifier
from tests.engine_fixtures import INPUT_SHAPE, MEAN, NUM_CLASSES, STD, fast_config, train_data

torch.set_num_threads(1)


def _trained(model: nn.Module) -> nn.Module:
    x, y = train_data()
    torch.manual_seed(0)
    train_classifier(model, x, y, TrainConfig(epochs=3, batch_size=32, max_lr=1e-2, shift=0, seed=0,
                                              label_smoothing=0.0))
    return model.eval()


class _BNNet(nn.Module):
    """Conv → BatchNorm2d → ReLU → pool → Linear → BatchNorm1d → Linear, on the 1×8×8 fixtures."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            Normalize(MEAN, STD), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


_BN_MODEL: dict[str, dict[str, torch.Tensor]] = {}


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = _BNNet()
    if "state" not in _BN_MODEL:
        _BN_MODEL["state"] = copy.deepcopy(_trained(model).state_dict())
    model.load_state_dict(_BN_MODEL["state"])
    return model.eval()


def _bn_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in state.items() if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _requests() -> list[ForgetRequest]:
    x, y = train_data()
    xs, ys = x[:4].clone(), y[:4].clone()
    cls = int(y[0])
    xc = x[y == cls][:4].clone()
    return [ForgetRequest("forget", xs, ys),
            ForgetRequest("relabel", xs, ys, targets=(ys + 1) % NUM_CLASSES),
            ForgetRequest("forget_class", xc, torch.full((4,), cls), forget_class=cls)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_default_round_leaves_batchnorm_running_statistics_bit_unchanged(index: int):
    model = _bn_model()
    before = _bn_buffers(copy.deepcopy(model.state_dict()))
    assert len(before) == 6
    request = _requests()[index]
    for scope in ("head_row", "all") if request.kind == "forget_class" else ("head_row",):
        config = fast_config(max_steps=20, class_scope=scope)
        assert not config.bn_train
        res = run_round(model, request, get_method("adv_imp"), config, generator=torch.Generator().manual_seed(0),
                        num_classes=NUM_CLASSES, importance=ImportancePlugin("none"))
        assert res.outcome in OUTCOMES and res.steps > 0
        for name, t in before.items():
            assert torch.equal(res.state[name], t), name
            assert torch.equal(model.state_dict()[name], t), name


def test_a_committed_session_round_leaves_batchnorm_running_statistics_bit_unchanged():
    model = _bn_model()
    before = _bn_buffers(copy.deepcopy(model.state_dict()))
    session = UnlearningSession(model, num_classes=NUM_CLASSES, seed=0)
    res, _ = session.run_round(_requests()[0], config=fast_config(max_steps=60))
    assert res.succeeded and session.rounds_applied == 1
    for name, t in before.items():
        assert torch.equal(session.model.state_dict()[name], t), name
    assert any(n.endswith("running_mean") for n in before)


def test_the_paper_setting_trains_batchnorm_as_l2ul_does():
    """bn_train=True (the ``paper`` preset) is kept faithful: its training forwards update the copy's statistics."""
    model = _bn_model()
    res = run_round(model, _requests()[0], get_method("adv_imp"), fast_config(max_steps=3, bn_train=True),
                    generator=torch.Generator().manual_seed(0), num_classes=NUM_CLASSES,
                    importance=ImportancePlugin("none"))
    assert preset("paper").bn_train and not preset("default").bn_train
    tracked = [n for n in res.state if n.endswith("num_batches_tracked")]
    assert all(int(res.state[n]) > int(model.state_dict()[n]) for n in tracked)


# -- a head that is not the last Linear ---------------------------------------------------------------
class _HeadFirst(nn.Module):
    """The head is registered first, and an auxiliary Linear with as many outputs comes after it (as
    Inception's training-only AuxLogits): the last Linear in __init__ order is not the head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, NUM_CLASSES)
        self.norm = Normalize(MEAN, STD)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.aux = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.norm(x)))


class _ConvHead(nn.Module):
    """SqueezeNet's shape: a 1×1 Conv2d with one output channel per class, then global pooling (no Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(Normalize(MEAN, STD), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 4, stride=4), nn.ReLU())
        self.classifier = nn.Conv2d(32, NUM_CLASSES, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.classifier(self.features(x)))


_HEADS: dict[str, dict[str, torch.Tensor]] = {}


def _head_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = _HeadFirst() if kind == "first" else _ConvHead()
    if kind not in _HEADS:
        _HEADS[kind] = copy.deepcopy(_trained(model).state_dict())
    model.load_state_dict(_HEADS[kind])
    return model.eval()


def test_the_head_is_found_by_execution_order_or_declared_and_reported():
    model = _head_model("first")
    x = train_data()[0][:2]
    found = find_head(model, NUM_CLASSES, x=x)
    assert (found.name, found.how) == ("head", "found") and "'head'" in found.describe()
    assert find_head(model, NUM_CLASSES).name == "aux"        # without inputs: the registration-order rule
    assert find_head(model, NUM_CLASSES, head="head").how == "declared"
    conv = find_head(_head_model("conv"), NUM_CLASSES, x=x)
    assert conv.name == "classifier" and isinstance(conv.module, nn.Conv2d)
    with pytest.raises(ValueError, match="'body.1'.*nn.Linear with 4 outputs"):
        find_head(model, NUM_CLASSES, head="body.1")
    with pytest.raises(ValueError, match="'nope' is not a module"):
        output_layer(model, NUM_CLASSES, head="nope")


@pytest.mark.parametrize("kind", ["first", "conv"])
def test_a_head_that_is_not_the_last_linear_is_unlearned_correctly(kind: str):
    model = _head_model(kind)
    x, y = train_data()
    # an instance round forgets its instances
    res = run_round(model, ForgetRequest("forget", x[:4], y[:4]), get_method("adv_imp"), fast_config(),
                    generator=torch.Generator().manual_seed(0), num_classes=NUM_CLASSES,
                    importance=ImportancePlugin("none"))
    assert res.outcome == "forgotten" and res.acc_forget == 0.0
    # a class round scoped to the head's row moves that row (or output channel) only
    cls = 1
    xs = x[y == cls][:6]
    request = ForgetRequest("forget_class", xs, torch.full((6,), cls), forget_class=cls)
    res = run_round(model, request, get_method("adv_imp"), fast_config(lr=1e-2, class_scope="head_row"),
                    generator=torch.Generator().manual_seed(0), num_classes=NUM_CLASSES,
                    importance=ImportancePlugin("none"))
    assert res.outcome == "forgotten" and res.acc_forget == 0.0
    head = "head" if kind == "first" else "classifier"
    before = model.state_dict()
    others = [r for r in range(NUM_CLASSES) if r != cls]
    for name, tensor in res.state.items():
        if name.startswith(head + "."):
            assert torch.equal(tensor[others], before[name][others]), name
            assert not torch.equal(tensor[cls], before[name][cls]), name
        else:
            assert torch.equal(tensor, before[name]), name


# -- grouped, depthwise and dilated convs in the subspace memory ------------------------------------
@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Conv2d(4, 4, 3, padding=2, groups=4,
                                  dilation=2), nn.Conv2d(4, 6, 3, padding=2, dilation=2, stride=2, bias=False)])
def test_a_projected_update_keeps_a_grouped_or_dilated_conv_output_on_protected_inputs(conv: nn.Conv2d):
    torch.manual_seed(0)
    x = torch.rand(3, 4, 6, 6)
    assert list(protectable_layers(conv)) == [""]
    memory = SubspaceMemory(0.99999).extended(conv, x)
    with torch.no_grad():
        out0 = conv(x).clone()
    projector = _UpdateProjector({"": (conv, memory.bases[""])})
    projector.before()
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight))
        if conv.bias is not None:
            conv.bias.add_(torch.randn_like(conv.bias))
    projector.after()
    with torch.no_grad():
        assert torch.allclose(conv(x), out0, atol=1e-3)
    cov = layer_input_covariances(conv, x)[""]
    assert cov.shape[0] == conv.weight[0].numel() + (conv.bias is not None)


# -- a session round on real classifiers ------------------------------------------------------------
class _Gray3(nn.Module):
    """The 1 → 3 channel input adapter a user would put in front of an RGB torchvision model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


class _MobileBlock(nn.Module):
    """A MobileNetV3-like model: depthwise + squeeze-excitation + hardswish, grouped and dilated convs, BN."""

    def __init__(self) -> None:
        super().__init__()
        tv = import_torchvision()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardswish())
        self.se = tv.ops.SqueezeExcitation(8, 4, scale_activation=nn.Hardsigmoid)
        self.grouped = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.grouped(self.se(self.dw(self.stem(x)))))


def _real(name: str, hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    if name == "vit":
        net = import_torchvision().models.VisionTransformer(image_size=28, patch_size=7, num_layers=1, num_heads=2,
                                                            hidden_dim=hidden, mlp_dim=32, num_classes=10)
        nn.init.normal_(net.heads.head.weight, std=0.5)   # torchvision zero-inits the head: all logits tie
        return nn.Sequential(Normalize([0.5], [0.25]), _Gray3(), net).eval()
    if name == "mobilenet_v3_small":
        net = import_torchvision().models.mobilenet_v3_small(num_classes=10)
        return nn.Sequential(Normalize([0.5], [0.25]), _Gray3(), net).eval()
    return nn.Sequential(Normalize([0.5], [0.25]), _MobileBlock()).eval()


@pytest.mark.parametrize("name", ["block", "vit", "mobilenet_v3_small"])
def test_a_session_round_runs_on_real_classifiers_and_reports_what_the_memory_protects(name: str, caplog):
    model = _real(name)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(x).argmax(1)
    buffers = {n: t.clone() for n, t in model.state_dict().items() if "running" in n or "num_batches" in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    session = UnlearningSession(model, num_classes=10, seed=0)
    config = preset("default", "adv_imp").with_overrides(max_steps=8, pgd_iterations=5, adv_per_instance=2,
                                                         anchor_deform=2)
    with caplog.at_level(logging.INFO, logger="daemon.engine.session"):
        res, _ = session.run_round(ForgetRequest("forget", x, labels), method="adv_imp", config=config,
                                   commit=False)
    assert res.outcome in OUTCOMES and res.steps > 0
    assert "subspace memory protects" in caplog.text
    report = session.protection
    if name == "vit":
        assert any(n.endswith("heads.head.weight") for n in report.protected)
        assert any(n.endswith("in_proj_weight") for n in report.protected)       # self-attention: protected
        assert any(n.endswith("out_proj.weight") for n in report.protected)
        assert any(n.endswith("class_token") for n in report.left_out)
        assert any(n.endswith("pos_embedding") for n in report.left_out)
        assert any("ln_1" in n for n in report.left_out)
        assert 0.0 <= unprotected_update_share(before, res.state, report) <= 1.0
    else:
        assert any("normalisation" in why for why in report.left_out.values())
        dw = [n for n, m in protectable_layers(model).items() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert dw, "the depthwise and grouped convs are protected"
    for n, t in buffers.items():
        assert torch.equal(res.state[n], t), n
    # the memory the round would leave covers the grouped convs with bases of the right width
    if res.succeeded:
        session.commit(res, res.importance)
        assert session.memory.check(session.model)


def test_importance_and_collapse_checks_work_on_bn_layernorm_attention_and_depthwise():
    from daemon.engine.importance import mas_importance
    for name in ("block", "vit"):
        model = _real(name)
        x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        for train in (False, True):
            raw = mas_importance(model, x, train=train)
            assert set(raw) == {n for n, p in model.named_parameters() if p.requires_grad}
            assert all(torch.isfinite(t).all() for t in raw.values())
        sentinel = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        assert 0.0 < _top_share(model, sentinel) <= 1.0
        assert not _forget_set_collapsed(model, ForgetRequest("forget", x, torch.tensor([0, 1])), 0.9)
    # a BatchNorm1d model's importance on one instance: eval mode (the default round's) does not fail
    mas_importance(_bn_model(), train_data()[0][:1], train=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        mas_importance(_bn_model(), train_data()[0][:1], train=True)


def test_the_report_lists_every_trainable_parameter_once():
    for name in ("block", "vit"):
        model = _real(name)
        report = protection_report(model)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(report.protected) | set(report.left_out) == names
        assert not set(report.protected) & set(report.left_out)
    assert UnlearnConfig().bn_train is False


def test_what_leaving_norms_and_tokens_out_costs_on_a_tiny_vit():
    """The share of a round's squared update that lands on parameters the memory leaves out (LayerNorm, the
    class token, the positional embedding), before and once the memory holds a committed round (printed)."""
    model = _real("vit")
    session = UnlearningSession(model, num_classes=10, seed=0)
    config = preset("default", "adv_imp").with_overrides(max_steps=200)
    shares = []
    for seed in (1, 2):
        x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            labels = session.model(x).argmax(1)
        before = {n: p.detach().clone() for n, p in session.model.named_parameters()}
        res, _ = session.run_round(ForgetRequest("forget", x, labels), config=config)
        assert res.outcome == "forgotten"
        shares.append(unprotected_update_share(before, res.state, session.protection))
    print(f"tiny ViT: {1 - session.protection.protected_share:.1%} of trainable values left out; their share of "
          f"the squared update: round 1 {shares[0]:.1%}, round 2 (memory on) {shares[1]:.1%}")
    assert shares[1] > shares[0]    # the memory pushes the update onto what it leaves out


def test_a_later_round_keeps_the_attention_projections_on_an_earlier_round_s_tokens():
    """Self-attention's packed input projection and its out_proj are held like any Linear: after a second
    round, both compute on the first round's instances' tokens what they computed when it committed."""
    from daemon.engine.subspace import layer_inputs

    model = _real("vit", hidden=64)            # 65-wide rows: one instance's 17 tokens leave room to move
    session = UnlearningSession(model, num_classes=10, seed=0)
    config = preset("default", "adv_imp").with_overrides(max_steps=200)
    x1 = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels1 = session.model(x1).argmax(1)
    assert session.run_round(ForgetRequest("forget", x1, labels1), config=config)[0].outcome == "forgotten"
    attention = {n: m for n, m in protectable_layers(session.model).items() if "self_attention" in n}
    assert len(attention) == 2 and set(session.memory.bases) >= set(attention)
    rows = {n: inputs.covariance() for n, inputs in layer_inputs(session.model, x1).items() if n in attention}
    weights1 = {n: torch.cat([m.weight.detach().reshape(m.weight.shape[0], -1), m.bias.detach()[:, None]], 1)
                for n, m in attention.items()}
    x2 = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels2 = session.model(x2).argmax(1)
    assert session.run_round(ForgetRequest("forget", x2, labels2), config=config)[0].outcome == "forgotten"
    for n, m in attention.items():
        w2 = torch.cat([m.weight.detach().reshape(m.weight.shape[0], -1), m.bias.detach()[:, None]], 1)
        delta = (w2 - weights1[n]).double()
        assert float(delta.norm()) > 0, f"{n} moved in round 2"
        # the energy of the change on round 1's rows, against the change's energy on rows in general
        on_old = float(torch.trace(delta @ rows[n] @ delta.T)) / float(torch.trace(rows[n]))
        overall = float(delta.pow(2).sum()) / delta.shape[1]
        assert on_old < 1e-3 * overall, (n, on_old, overall)


def test_freeze_unprotected_keeps_what_the_memory_cannot_hold_out_of_the_optimiser_once_it_holds_a_round():
    """``freeze_unprotected``: once the memory holds a round, BatchNorm's scale and shift (which it cannot
    protect) leave the round's optimiser; with an empty memory, or the setting off, they stay in it."""
    import copy

    from daemon.engine.kinds import get_kind
    from daemon.engine.rounds import _optimiser
    from daemon.engine.subspace import SubspaceMemory

    model = _real("block")
    norm = set(protection_report(model).left_out)
    assert norm, "the block has BatchNorm affine parameters"
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    request = ForgetRequest("forget", x, torch.tensor([0, 1]))
    held = SubspaceMemory(0.99999).extended(model, torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2)))
    for memory, freeze, kept in ((SubspaceMemory(0.99999), True, True), (held, False, True), (held, True, False)):
        work = copy.deepcopy(model)
        config = preset("default", "adv_imp").with_overrides(freeze_unprotected=freeze)
        _, params, _ = _optimiser(work, request, get_kind("forget"), config, x, memory, 10)
        ids = {id(p) for p in params}
        in_optimiser = {n for n, p in work.named_parameters() if id(p) in ids}
        assert (norm <= in_optimiser) is kept and (not (norm & in_optimiser)) is (not kept), (freeze, in_optimiser)
