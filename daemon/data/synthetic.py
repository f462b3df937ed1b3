"""A tiny synthetic dataset for unit tests: learnable in a few steps, but not trivially.

Unit tests of training, attacks and unlearning need data that a small model fits in well under a
second, yet where a forget request visibly changes predictions; MNIST is too slow to load for
that. Each class has a random prototype image; an example is its class prototype plus Gaussian
noise, clipped to [0, 1]. With the default noise, classes overlap a little, so a model reaches
high but not perfect accuracy and adversarial examples exist near the class boundaries.
Everything is drawn from one seeded generator, so the same arguments give the same tensors.
"""

from __future__ import annotations

import torch

from daemon.data.splits import DatasetSplits

__all__ = ["synthetic_splits"]


def synthetic_splits(
    n_train: int = 512,
    n_test: int = 256,
    num_classes: int = 4,
    shape: tuple[int, int, int] = (1, 8, 8),
    seed: int = 0,
    noise: float = 0.4,
) -> DatasetSplits:
    """Class prototypes plus noise, as a :class:`DatasetSplits` named ``synthetic``.

    Arguments:
        n_train, n_test: examples per split, with classes as balanced as the counts allow.
        num_classes: at least 2; the classes are named ``"0"``, ``"1"``, ...
        shape: ``(C, H, W)`` of one example.
        seed: the same seed gives the same data.
        noise: standard deviation of the per-pixel Gaussian noise (prototypes lie in [0.2, 0.8]).
    """
    for label, value, minimum in (("n_train", n_train, num_classes), ("n_test", n_test, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"shape must be (C, H, W) of positive integers, got {shape!r}")
    if not noise >= 0.0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    generator = torch.Generator().manual_seed(seed)
    prototypes = 0.2 + 0.6 * torch.rand((num_classes, *shape), generator=generator)

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]
        jitter = noise * torch.randn((count, *shape), generator=generator)
        return (prototypes[labels] + jitter).clamp_(0.0, 1.0), labels

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return DatasetSplits(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=tuple(str(i) for i in range(num_classes)),
    )
