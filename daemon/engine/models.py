"""Classifiers the engine unlearns, each wrapped as ``Normalize → backbone``.

Normalisation lives inside the model (a buffer, not a ``.cuda()`` constant as in the paper's code),
so every attack and every served request works in [0, 1] pixel space and a TorchScript export needs
nothing beside the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from daemon.engine.heads import output_layer  # noqa: F401  (moved to heads.py; re-exported)

__all__ = ["ARCHS", "MnistCNN", "Normalize", "build_model", "output_layer"]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics kept as buffers (saved with the weights)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MnistCNN(nn.Module):
    """A lean two-conv CNN (0.2 M parameters, no BatchNorm) that reaches ≥ 99% on MNIST.

    Lean on purpose: an unlearning round is dominated by attack forward/backward passes, so every
    channel saved here is saved thousands of times per round on a 2-core CPU.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, hidden: int = 128,
                 image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _mnist_cnn(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    c, h, w = input_shape
    if h != w or h % 4:
        raise ValueError(f"mnist_cnn needs square inputs with a side divisible by 4, got {h}×{w}")
    return MnistCNN(num_classes=num_classes, in_channels=c, image_size=h)


def _cifar_resnet18(num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    from daemon.engine.resnet import cifar_resnet18

    if input_shape[0] != 3:
        raise ValueError(f"cifar_resnet18 needs 3-channel inputs, got {input_shape[0]}")
    return cifar_resnet18(num_classes=num_classes)


ARCHS: dict[str, Callable[[int, tuple[int, int, int]], nn.Module]] = {
    "mnist_cnn": _mnist_cnn,
    "cifar_resnet18": _cifar_resnet18,
}


def build_model(arch: str, *, num_classes: int, input_shape: tuple[int, int, int],
                mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """The classifier as ``Sequential(normalize, backbone)``, input float32 NCHW in [0, 1], output logits."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCHS))}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return nn.Sequential(Normalize(mean, std), ARCHS[arch](num_classes, tuple(input_shape)))
