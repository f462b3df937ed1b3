"""The data-free anchors: random affine copies of the forget instances."""

from __future__ import annotations

import pytest
import torch

from daemon.engine.anchors import deformations
from daemon.engine.methods import get_method
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import run_round
from tests.engine_fixtures import NUM_CLASSES, fast_config, forget_set, tiny_model, train_data


def _images(n: int = 3) -> torch.Tensor:
    x = torch.zeros(n, 1, 12, 12)
    x[:, :, 3:9, 5:7] = 1.0          # a bar in the middle, away from the border
    return x


def test_copies_have_the_inputs_shape_stay_in_pixel_range_and_follow_the_generator():
    x = _images()
    a = deformations(x, 5, torch.Generator().manual_seed(0))
    b = deformations(x, 5, torch.Generator().manual_seed(0))
    c = deformations(x, 5, torch.Generator().manual_seed(1))
    assert a.shape == (15, 1, 12, 12)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every copy is a variation of its own source: not equal to it, but about as much ink (scale ±10%)
    src = x.repeat_interleave(5, 0)
    assert bool(((a - src).flatten(1).norm(dim=1) > 0).all())
    ratio = a.flatten(1).sum(1) / src.flatten(1).sum(1)
    assert bool(((ratio > 0.7) & (ratio < 1.3)).all()), ratio


def test_the_identity_transform_returns_the_instance():
    x = _images()
    same = deformations(x, 2, torch.Generator().manual_seed(0), max_shift=0.0, max_rotate_deg=0.0, scale=(1.0, 1.0))
    assert torch.allclose(same, x.repeat_interleave(2, 0), atol=1e-6)


def test_no_copies_asked_or_no_instances_give_an_empty_batch():
    x = _images()
    assert deformations(x, 0, torch.Generator()).shape == (0, 1, 12, 12)
    assert deformations(x[:0], 4, torch.Generator()).shape == (0, 1, 12, 12)


def _run(request: ForgetRequest, method: str, **cfg):
    return run_round(tiny_model(), request, get_method(method), fast_config(lr=1e-3, **cfg),
                     generator=torch.Generator().manual_seed(0), num_classes=NUM_CLASSES)


def test_a_forget_round_holds_its_anchors_beside_the_adversarial_examples():
    x, y = forget_set(4, 8)
    res = _run(ForgetRequest("forget", x, y), "adv", anchor_deform=3)
    assert res.succeeded and res.anchor_examples == 12 and res.adversarial_examples == 8
    off = _run(ForgetRequest("forget", x, y), "adv", anchor_deform=0)
    assert off.anchor_examples == 0
    plain = _run(ForgetRequest("forget", x, y), "neggrad", anchor_deform=3)
    assert plain.anchor_examples == 0    # anchors belong to the adversarial term


def test_forget_class_rounds_use_no_anchors_since_copies_of_the_class_must_go_too():
    x, y = train_data()
    xs = x[y == 1][:4]
    res = _run(ForgetRequest("forget_class", xs, torch.full((4,), 1), forget_class=1), "adv",
               anchor_deform=3)
    assert res.anchor_examples == 0


def test_forget_class_forgets_copies_of_its_examples_too():
    x, y = train_data()
    xs = x[y == 1][:4]
    request = ForgetRequest("forget_class", xs, torch.full((4,), 1), forget_class=1)
    for method in ("adv", "neggrad", "random_label", "boundary_shrink"):
        res = _run(request, method, class_copies=3, class_scope="all")
        assert res.outcome == "forgotten" and res.acc_forget == 0.0, method
        assert res.predictions_after.shape == (4,)      # accuracy and predictions are the request's own


def test_negative_copy_counts_are_refused_by_name():
    import pytest
    from daemon.engine.config import UnlearnConfig
    for name in ("anchor_deform", "class_copies"):
        with pytest.raises(ValueError, match=name):
            UnlearnConfig(**{name: -1})


def test_class_impressions_join_the_held_examples_of_instance_rounds_only():
    x, y = forget_set(4, 8)
    plain = _run(ForgetRequest("forget", x, y), "adv", anchor_deform=3)
    res = _run(ForgetRequest("forget", x, y), "adv", anchor_deform=3, held_impressions=10)
    assert res.succeeded and res.anchor_examples == 12 + 10 and res.adversarial_examples == 8
    # they are in the held term: the round ends elsewhere
    assert any(not torch.equal(res.state[k], plain.state[k]) for k in res.state)
    assert _run(ForgetRequest("forget", x, y), "neggrad", held_impressions=10).anchor_examples == 0
    tx, ty = train_data()
    xs = tx[ty == 1][:4]     # a class round changes the model everywhere by design: nothing to hold there
    assert _run(ForgetRequest("forget_class", xs, torch.full((4,), 1), forget_class=1), "adv",
                held_impressions=10).anchor_examples == 0


def test_held_impressions_must_not_be_negative():
    with pytest.raises(ValueError, match="held_impressions"):
        fast_config(held_impressions=-1)
