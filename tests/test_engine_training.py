"""daemon.engine.training: the pre-training recipe's options."""

from __future__ import annotations

import pytest
import torch

from daemon.engine.training import TrainConfig, train_classifier
from tests.engine_fixtures import new_model, train_data


def _confidence(smoothing: float) -> float:
    model = new_model(0)
    x, y = train_data()
    train_classifier(model, x, y, TrainConfig(epochs=3, batch_size=32, max_lr=1e-2, shift=0, seed=0,
                                              label_smoothing=smoothing))
    with torch.no_grad():
        probs = model(x).softmax(1)
    assert float((probs.argmax(1) == y).float().mean()) > 0.95
    return float(probs.max(1).values.mean())


def test_label_smoothing_trains_a_model_that_is_as_accurate_but_less_certain():
    sharp, smooth = _confidence(0.0), _confidence(0.3)
    # the smoothed target puts 1 - 0.3 + 0.3 / 4 = 0.775 on the label: the model learns about that
    assert sharp > 0.95 and 0.6 < smooth < 0.9


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_a_label_smoothing_outside_zero_to_one_is_refused(value: float):
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\)"):
        TrainConfig(label_smoothing=value)
