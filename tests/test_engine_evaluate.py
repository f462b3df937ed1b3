"""daemon.engine.evaluate: accuracy, predictions, the membership AUC, drift, flips, and eval_mode."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from daemon.engine.evaluate import (
    accuracy,
    eval_mode,
    loss_auc,
    param_drift_l2,
    per_sample_loss,
    predict,
    prediction_flip_ratio,
)


def _pixel_argmax() -> nn.Sequential:
    """Logits = the 4 pixels of a 1×2×2 image, so the prediction is the brightest pixel; has a Dropout
    so that train and eval mode differ observably."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4, bias=False), nn.Dropout(0.5))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(4))
    return model


def _images(brightest: list[int]) -> torch.Tensor:
    x = torch.full((len(brightest), 4), 0.1)
    x[torch.arange(len(brightest)), torch.tensor(brightest, dtype=torch.int64)] = 0.9
    return x.view(-1, 1, 2, 2)


def test_predict_returns_the_argmax_as_cpu_int64_in_any_batch_size():
    x = _images([0, 3, 2, 1, 3])
    model = _pixel_argmax()
    pred = predict(model, x, batch_size=2)
    assert pred.dtype == torch.int64 and pred.device.type == "cpu"
    assert pred.tolist() == [0, 3, 2, 1, 3]
    assert torch.equal(predict(model, x), pred)
    empty = predict(model, x[:0])
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_accuracy_is_the_share_of_correct_predictions():
    x = _images([0, 3, 2, 1])
    model = _pixel_argmax()
    assert accuracy(model, x, torch.tensor([0, 3, 2, 1])) == 1.0
    assert accuracy(model, x, torch.tensor([0, 3, 0, 0]), batch_size=3) == 0.5
    assert accuracy(model, x, torch.tensor([1, 0, 0, 0])) == 0.0


def test_accuracy_is_nan_on_an_empty_set_and_rejects_mismatched_labels():
    model = _pixel_argmax()
    assert math.isnan(accuracy(model, _images([]), torch.empty(0, dtype=torch.int64)))
    with pytest.raises(ValueError, match="need as many labels as images, got 2 images and 3 labels"):
        accuracy(model, _images([0, 1]), torch.tensor([0, 1, 2]))


def test_per_sample_loss_is_the_cross_entropy_of_each_example():
    x = _images([0, 3, 2])
    y = torch.tensor([0, 1, 2])
    expected = F.cross_entropy(x.flatten(1), y, reduction="none")
    torch.testing.assert_close(per_sample_loss(_pixel_argmax(), x, y), expected)


@pytest.mark.parametrize("start_training", [True, False])
def test_measurements_leave_the_model_in_the_mode_they_found_it(start_training):
    model = _pixel_argmax().train(start_training)
    x = _images([0, 1, 2, 3])
    predict(model, x)
    accuracy(model, x, torch.tensor([0, 1, 2, 3]))
    per_sample_loss(model, x, torch.tensor([0, 1, 2, 3]))
    assert model.training is start_training
    assert all(m.training is start_training for m in model.modules())


def test_eval_mode_switches_off_training_and_grad_and_restores_train_mode():
    model = _pixel_argmax().train()
    with eval_mode(model) as m:
        assert m is model
        assert not model.training and not model[2].training
        assert not torch.is_grad_enabled()
        out = model(_images([1]))
        assert not out.requires_grad
    assert model.training and model[2].training
    assert torch.is_grad_enabled()


def test_eval_mode_restores_train_mode_when_the_block_raises():
    model = _pixel_argmax().train()
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert model.training


def test_eval_mode_keeps_an_eval_model_in_eval():
    model = _pixel_argmax().eval()
    with eval_mode(model):
        pass
    assert not model.training


# -- loss_auc ---------------------------------------------------------------------------------------

def _auc_bruteforce(m: torch.Tensor, n: torch.Tensor) -> float:
    pairs = [1.0 if a < b else 0.5 if a == b else 0.0 for a, b in itertools.product(m.tolist(), n.tolist())]
    return sum(pairs) / len(pairs)


def test_loss_auc_is_1_when_every_member_loss_is_below_every_non_member():
    assert loss_auc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 5.0])) == 1.0
    assert loss_auc(torch.tensor([0.4, 5.0]), torch.tensor([0.1, 0.2, 0.3])) == 0.0


def test_loss_auc_is_one_half_for_identical_distributions():
    losses = torch.rand(50, generator=torch.Generator().manual_seed(0))
    assert loss_auc(losses, losses.clone()) == pytest.approx(0.5)
    assert loss_auc(torch.full((7,), 2.0), torch.full((3,), 2.0)) == pytest.approx(0.5)


def test_loss_auc_counts_ties_as_half():
    assert loss_auc(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0])) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_auc_matches_the_pairwise_definition_with_many_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    members = torch.randint(0, 5, (13,), generator=gen).float()
    nonmembers = torch.randint(1, 6, (9,), generator=gen).double()
    assert loss_auc(members, nonmembers) == pytest.approx(_auc_bruteforce(members, nonmembers))


def test_loss_auc_is_nan_when_either_side_is_empty():
    assert math.isnan(loss_auc(torch.empty(0), torch.tensor([1.0])))
    assert math.isnan(loss_auc(torch.tensor([1.0]), torch.empty(0)))


# -- drift and flips -----------------------------------------------------------------------------------

def test_param_drift_l2_is_the_l2_norm_over_shared_float_tensors():
    ref = {"a": torch.zeros(2), "b": torch.zeros(1, 1), "steps": torch.tensor([0]), "gone": torch.zeros(3)}
    cur = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]]), "steps": torch.tensor([100]),
           "extra": torch.full((5,), 9.0)}
    assert param_drift_l2(cur, ref) == pytest.approx(5.0)
    assert param_drift_l2(ref, ref) == 0.0
    assert param_drift_l2({}, ref) == 0.0


def test_param_drift_l2_reads_a_models_state_dict():
    model = _pixel_argmax()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[1].weight.add_(0.5)          # 16 entries moved by 0.5 → drift 2
    assert param_drift_l2(model.state_dict(), ref) == pytest.approx(2.0)


def test_prediction_flip_ratio_is_the_share_of_changed_predictions():
    before = torch.tensor([0, 1, 2, 3])
    assert prediction_flip_ratio(before, torch.tensor([0, 1, 3, 3])) == 0.25
    assert prediction_flip_ratio(before, before.clone()) == 0.0
    assert prediction_flip_ratio(before, torch.tensor([1, 2, 3, 0])) == 1.0
    assert math.isnan(prediction_flip_ratio(before[:0], before[:0]))
    with pytest.raises(ValueError, match=r"prediction tensors differ in shape: \(4,\) vs \(3,\)"):
        prediction_flip_ratio(before, before[:3])
