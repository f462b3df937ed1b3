"""daemon.engine.subspace: the gradient-projection memory that later rounds may not disturb."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from daemon.engine.requests import ForgetRequest
from daemon.engine.session import UnlearningSession
from daemon.engine.subspace import SubspaceMemory, layer_input_covariances, protectable_layers
from tests.engine_fixtures import NUM_CLASSES, fast_config, forget_set, state_equal, synthetic, tiny_model


def _low_rank_inputs(n: int = 64, width: int = 10, rank: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=gen) @ torch.randn(rank, width, generator=gen)


@pytest.mark.parametrize("bias", [True, False])
def test_a_projected_update_leaves_the_layer_unchanged_on_the_remembered_inputs(bias: bool):
    torch.manual_seed(0)
    layer = nn.Linear(10, 4, bias=bias)
    x = _low_rank_inputs()
    memory = SubspaceMemory(0.999999).extended(layer, x)
    assert memory.dims() == {"": 3 + bias}            # rank 3 rows, plus the constant bias input
    before = layer(x).detach()
    fresh = torch.randn(8, 10)
    fresh_before = layer(fresh).detach()
    projector = memory.projector(layer)
    projector.before()
    with torch.no_grad():                              # any update, e.g. what Adam did this step
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    projector.after()
    torch.testing.assert_close(layer(x), before, atol=1e-4, rtol=0)
    assert not torch.allclose(layer(fresh), fresh_before, atol=1e-2)   # off the remembered span it changed


def test_conv_layers_are_remembered_per_patch_and_protected():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3, padding=1)
    x = torch.rand(6, 1, 8, 8)
    memory = SubspaceMemory(0.999999).extended(conv, x)
    before = conv(x).detach()
    projector = memory.projector(conv)
    projector.before()
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight))
    projector.after()
    # 9 patch values + bias span all of R^10 for random images: nothing may move
    assert memory.dims()[""] == 10
    torch.testing.assert_close(conv(x), before, atol=1e-4, rtol=0)


def test_a_layer_with_almost_no_free_energy_for_the_round_stays_fixed():
    """Adam moves every weight by about lr whatever its gradient: a layer whose free directions the
    round's instances barely reach is frozen instead of drifting where other inputs live."""
    torch.manual_seed(0)
    layer = nn.Linear(10, 4)
    remembered = _low_rank_inputs(rank=3, seed=1)
    memory = SubspaceMemory(0.999999).extended(layer, remembered)
    inside = torch.rand(8, 64) @ remembered / 8 + 1e-3 * torch.randn(8, 10)         # nearly in the span
    outside = torch.randn(8, 10)
    share_in, share_out = memory.free_share(layer, inside)[""], memory.free_share(layer, outside)[""]
    assert share_in < 1e-4 and share_out > 0.3
    for x, frozen in ((inside, True), (outside, False)):
        projector = memory.projector(layer, x, freeze_below=0.01)
        assert projector.frozen == ({""} if frozen else set())
        w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
        projector.before()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
        projector.after()
        assert torch.equal(layer.weight, w0) == frozen and torch.equal(layer.bias, b0) == frozen
    # without the round's inputs (or with the rule off) nothing is frozen
    assert memory.projector(layer).frozen == set() == memory.projector(layer, inside, 0.0).frozen


def test_the_energy_threshold_sets_how_much_is_kept():
    x = torch.cat([_low_rank_inputs(rank=2, seed=1) * 10, _low_rank_inputs(rank=6, seed=2) * 0.1])
    layer = nn.Linear(10, 4, bias=False)
    cov = layer_input_covariances(layer, x)[""].double()
    for energy in (0.5, 0.9, 0.999):
        basis = SubspaceMemory(energy).extended(layer, x).bases[""].double()
        kept = float(torch.trace(basis.T @ cov @ basis)) / float(torch.trace(cov))
        assert kept >= energy
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype), atol=1e-5, rtol=0)
    small = SubspaceMemory(0.5).extended(layer, x).dims()[""]
    large = SubspaceMemory(0.999).extended(layer, x).dims()[""]
    assert small < large <= 8


def test_extending_keeps_the_old_directions_and_adds_only_new_ones():
    layer = nn.Linear(10, 4, bias=False)
    first = SubspaceMemory(0.999999).extended(layer, _low_rank_inputs(rank=2, seed=1))
    again = first.extended(layer, _low_rank_inputs(rank=2, seed=1))
    assert again.dims() == first.dims() == {"": 2}
    both = first.extended(layer, _low_rank_inputs(rank=3, seed=2))
    assert both.dims() == {"": 5}
    old = first.bases[""]
    torch.testing.assert_close(both.bases[""] @ (both.bases[""].T @ old), old, atol=1e-5, rtol=0)
    assert first.dims() == {"": 2}                        # extended() returns a new memory


def test_an_energy_outside_zero_to_one_is_refused_and_zero_is_off():
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match="memory energy"):
            SubspaceMemory(bad)
    off = SubspaceMemory(0.0)
    assert not off.enabled and off.extended(nn.Linear(3, 2), torch.rand(4, 3)).bases == {}
    assert off.projector(nn.Linear(3, 2)) is None


def test_a_basis_that_does_not_fit_the_model_is_refused():
    model = tiny_model()
    layers = protectable_layers(model)
    name = next(iter(layers))
    with pytest.raises(ValueError, match="has shape"):
        SubspaceMemory(0.9, {name: torch.zeros(3, 1)}).check(model)
    with pytest.raises(ValueError, match="lacks"):
        SubspaceMemory(0.9, {"no.such.layer": torch.zeros(3, 1)}).check(model)


def _request(r: int) -> ForgetRequest:
    x, y = forget_set(4, 8 + 4 * r)
    return ForgetRequest("forget", x, y)


def test_a_later_round_keeps_the_layers_unchanged_on_what_the_memory_holds():
    """With a (near) complete memory, the next round may only move weights off the earlier rounds'
    subspaces: each protected layer computes the same on the earlier instances' inputs."""
    session = UnlearningSession(tiny_model(), num_classes=NUM_CLASSES, seed=3, memory_energy=0.999999)
    config = fast_config(lr=1e-3)
    sentinel = synthetic(16, seed=1)[0]
    first, _ = session.run_round(_request(0), method="adv", config=config, sentinel=sentinel)
    assert first.succeeded and session.memory.bases
    x0 = _request(0).x
    before = {n: v.detach() for n, v in _layer_outputs(session.model, x0).items()}
    second, _ = session.run_round(_request(1), method="adv", config=config.with_overrides(max_steps=5),
                                  sentinel=sentinel, commit=False)
    candidate = tiny_model()
    candidate.load_state_dict(second.state)
    moved = False
    for name, out in _layer_outputs(candidate, x0).items():
        # the protected layers see the earlier inputs' activations only through remembered directions
        # (up to the 1e-6 of energy left out); what differs downstream comes from the layers before
        moved |= not torch.equal(out, before[name])
    assert moved                                   # the round did change the model
    # the first protected layer sees the raw input: its output on the earlier instances is unchanged
    first_layer = next(iter(protectable_layers(candidate)))
    torch.testing.assert_close(_layer_outputs(candidate, x0)[first_layer], before[first_layer], atol=1e-3, rtol=0)


def _layer_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.detach()))
               for n, m in protectable_layers(model).items()]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


def test_only_committed_instance_rounds_extend_the_memory():
    session = UnlearningSession(tiny_model(), num_classes=NUM_CLASSES, seed=3)
    config = fast_config(lr=1e-3)
    sentinel = synthetic(16, seed=1)[0]
    result, _ = session.run_round(_request(0), method="adv_imp", config=config, sentinel=sentinel, commit=False)
    assert result.succeeded and session.memory.bases == {}      # not yet committed
    assert 0 < result.memory_s < result.wall_s                   # its cost is part of the round's
    session.commit(result, None)
    dims = session.memory.dims()
    assert dims and all(d > 0 for d in dims.values())
    failed, _ = session.run_round(_request(1), method="adv_imp", config=fast_config(lr=1e-7, max_steps=1),
                                  sentinel=sentinel)
    assert not failed.succeeded and session.memory.dims() == dims
    x, y = forget_set(8, 40)
    cls = int(y[0])
    keep = y == cls
    class_round, _ = session.run_round(ForgetRequest("forget_class", x[keep], y[keep], forget_class=cls),
                                       method="adv_imp", config=config, sentinel=sentinel)
    assert class_round.succeeded and session.memory.dims() == dims    # class rounds are global by design


def test_undo_restores_what_commit_changed():
    session = UnlearningSession(tiny_model(), num_classes=NUM_CLASSES, seed=3)
    sentinel = synthetic(16, seed=1)[0]
    snap = session.snapshot()
    weights = {k: v.clone() for k, v in session.model.state_dict().items()}
    session.run_round(_request(0), method="adv_imp", config=fast_config(lr=1e-3), sentinel=sentinel)
    assert session.rounds_applied == 1 and session.memory.bases
    session.undo(snap)
    assert session.rounds_applied == 0 and session.memory.bases == {} and session.importance is None
    assert state_equal(session.model.state_dict(), weights)


def test_a_version_1_state_restores_with_an_empty_memory():
    session = UnlearningSession(tiny_model(), num_classes=NUM_CLASSES, seed=3)
    tensors, meta = session.state()
    meta = {k: v for k, v in meta.items() if k != "memory_energy"} | {"state_version": 1}
    restored = UnlearningSession.restore(tiny_model(), tensors, meta)
    assert restored.memory.bases == {} and restored.memory.enabled


def test_layers_the_memory_freezes_leave_the_optimiser_and_a_full_memory_exhausts_at_once():
    session = UnlearningSession(tiny_model(), num_classes=NUM_CLASSES, seed=3, memory_energy=0.999999)
    config = fast_config(lr=1e-3)
    sentinel = synthetic(16, seed=1)[0]
    first, _ = session.run_round(_request(0), method="adv", config=config, sentinel=sentinel)
    assert first.succeeded
    live = {k: v.clone() for k, v in session.model.state_dict().items()}
    # the first convolution is full after one round (every patch direction): it stays as it is
    second, _ = session.run_round(_request(1), method="adv", config=config.with_overrides(max_steps=5),
                                  sentinel=sentinel, commit=False)
    frozen = set(second.frozen_layers)
    assert "1.features.0" in frozen and second.steps > 0
    for name in frozen:
        for suffix in (".weight", ".bias"):
            assert torch.equal(second.state[name + suffix], live[name + suffix])
    assert any(not torch.equal(second.state[k], live[k]) for k in live)
    # with the threshold above every layer's free share, nothing may move: the round stops before a step
    full, _ = session.run_round(_request(1), method="adv", config=config.with_overrides(memory_min_free=0.999),
                                sentinel=sentinel, commit=False)
    assert full.outcome == "budget_exhausted" and full.steps == 0 and "memory" in full.reason
    assert state_equal(full.state, live)


@pytest.mark.parametrize("with_basis", [False, True])
def test_few_wide_rows_give_the_same_directions_as_their_covariance(with_basis: bool):
    """A layer seen on fewer rows than its width keeps the rows (thin SVD) instead of AᵀA (full eigh):
    the same eigenpairs, so the memory protects the same span and holds the same share of energy."""
    from daemon.engine.subspace import LayerInputs, _grow

    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(12, 3, generator=gen, dtype=torch.double)
            @ torch.randn(3, 40, generator=gen, dtype=torch.double)) + 0.01 * torch.randn(12, 40, generator=gen,
                                                                                          dtype=torch.double)
    few, many = LayerInputs(40), LayerInputs(40)
    few.add(rows)
    many.add(rows)
    many.add(torch.zeros(30, 40, dtype=torch.double))   # past the width: kept as the covariance
    assert few.rows is not None and many.cov is not None
    assert few.total() == pytest.approx(many.total(), rel=1e-12)
    basis = None
    if with_basis:
        basis, _ = torch.linalg.qr(torch.randn(40, 2, generator=gen, dtype=torch.double))
        basis = basis.float()
    for energy in (0.9, 0.999, 0.99999):
        a, b = _grow(few, basis, energy), _grow(many, basis, energy)
        assert a.shape == b.shape
        torch.testing.assert_close(a @ a.T, b @ b.T, atol=1e-5, rtol=0)   # the same protected span
