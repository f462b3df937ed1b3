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


def _recipe_model(seed: int, x: torch.Tensor, y: torch.Tensor, barrier=None) -> dict[str, torch.Tensor]:
    """Build (nn.init draws) and train (dropout draws) one model from ``seed``, as a rebase does."""
    from daemon.engine.seeding import seeded_global_rng

    if barrier is not None:
        barrier.wait()
    with seeded_global_rng(seed):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 64), torch.nn.ReLU(),
                                    torch.nn.Dropout(0.5), torch.nn.Linear(64, 4))
        train_classifier(model, x, y, TrainConfig(epochs=2, batch_size=8, max_lr=1e-2, shift=0, seed=seed))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_one_seed_gives_one_model_while_other_threads_build_and_train_their_own():
    """A rebase's thread seeds torch's global generator while another model pretrains or rebases: each
    recipe's model (initial weights and dropout masks) is still its seed's, and the caller's generator state
    is given back untouched."""
    import threading

    x, y = train_data()
    alone = {seed: _recipe_model(seed, x, y) for seed in (1, 2, 3)}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    results: dict[int, dict[str, torch.Tensor]] = {}
    barrier = threading.Barrier(3)
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, _recipe_model(s, x, y, barrier)))
               for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(torch.rand(3), expected_next), "the caller's global generator state was not restored"
    for seed in (1, 2, 3):
        assert all(torch.equal(alone[seed][k], results[seed][k]) for k in alone[seed]), f"seed {seed} differs"
    assert not torch.equal(alone[1]["1.weight"], alone[2]["1.weight"])
