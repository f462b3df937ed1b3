"""Shared helpers for the engine tests: deterministic synthetic data and a tiny trained classifier.

Everything is tiny on purpose (1×8×8 images, 4 classes, the lean ``mnist_cnn``): the engine tests
share a 2-core CPU. The trained weights are cached per test session (``trained_state``); each test
builds a fresh module from them with ``tiny_model()``, so no test can disturb another's model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from daemon.engine.config import UnlearnConfig
from daemon.engine.models import build_model
from daemon.engine.training import TrainConfig, train_classifier

# These models are far too small to gain from intra-op threads, and on the shared 2-core machine a
# second torch thread spin-waiting for a busy core made rounds ~100x slower (measured: 12 s vs 0.07 s).
torch.set_num_threads(1)

NUM_CLASSES = 4
INPUT_SHAPE = (1, 8, 8)
MEAN, STD = [0.5], [0.25]
TRAIN_PER_CLASS = 64


def synthetic(n_per_class: int, *, seed: int, num_classes: int = NUM_CLASSES, noise: float = 0.15
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes (fixed by seed 1234) plus Gaussian noise, clipped to [0, 1].

    The prototypes are the same for every ``seed``; ``seed`` only draws the noise, so different
    seeds give different samples of the same task (train / held-out).
    """
    protos = torch.rand((num_classes, *INPUT_SHAPE), generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = protos[y] + noise * torch.randn((y.numel(), *INPUT_SHAPE), generator=gen)
    perm = torch.randperm(y.numel(), generator=gen)
    return x.clamp(0, 1)[perm].contiguous(), y[perm].contiguous()


def new_model(seed: int = 0) -> nn.Sequential:
    """An untrained tiny classifier (``Normalize → MnistCNN`` on 1×8×8), seeded."""
    torch.manual_seed(seed)
    return build_model("mnist_cnn", num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE, mean=MEAN, std=STD)


@functools.lru_cache(maxsize=None)
def train_data() -> tuple[torch.Tensor, torch.Tensor]:
    return synthetic(TRAIN_PER_CLASS, seed=0)


@functools.lru_cache(maxsize=None)
def trained_state() -> dict[str, torch.Tensor]:
    """Weights of the tiny classifier trained to (near) 100% train accuracy; computed once per session."""
    model = new_model(0)
    x, y = train_data()
    # plain targets: the synthetic tests' tolerances were set on this model (MNIST models use the recipe's default)
    train_classifier(model, x, y, TrainConfig(epochs=3, batch_size=32, max_lr=1e-2, shift=0, seed=0,
                                              label_smoothing=0.0))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_model() -> nn.Sequential:
    """A fresh module holding the cached trained weights, in eval mode."""
    model = new_model(0)
    model.load_state_dict(trained_state())
    model.eval()
    return model


def forget_set(n: int = 4, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training instances (a slice of the training set) to unlearn."""
    x, y = train_data()
    return x[start:start + n].clone(), y[start:start + n].clone()


def fast_config(**overrides) -> UnlearnConfig:
    """A round setting small enough for the tiny model: few adversarial examples, short PGD, Adam."""
    base = UnlearnConfig(
        pgd_eps=2.0, pgd_step=0.25, pgd_iterations=20, adv_per_instance=2, attack_batch=256,
        optimizer="adam", lr=1e-2, momentum=0.0, adv_batch=16, max_steps=100, check_every=5, anchor_deform=2,
    )
    return base.with_overrides(**overrides)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
