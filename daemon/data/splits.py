"""One in-memory shape for every dataset: train and test tensors plus the class names.

Loaders (MNIST, CIFAR-10, synthetic) all return a :class:`DatasetSplits`, so training, probes,
refs (``<name>-train:<i>``) and the model's input shape never depend on where the data came from.
It is validated once at construction, so code downstream can rely on the dtypes, the [0, 1] range
and the label range without checking again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DatasetSplits"]

_CHUNK = 4096  # images per chunk in mean_std: bounded memory for the float64 accumulation


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test splits.

    Arguments:
        name: short dataset name; also the prefix of its ref sources (``mnist`` → ``mnist-train``).
        train_x, test_x: float32 ``N×C×H×W`` images with values in [0, 1].
        train_y, test_y: int64 ``N`` labels in ``[0, len(classes))``.
        classes: class names, indexed by label.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.classes, tuple) or not all(isinstance(c, str) for c in self.classes):
            raise ValueError(f"classes must be a tuple of strings, got {self.classes!r}")
        if len(self.classes) < 2:
            raise ValueError(f"a dataset needs at least 2 classes, got {len(self.classes)}")
        shape = None
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 4:
                raise ValueError(f"{split}_x must be a float32 N×C×H×W tensor, got {_describe(x)}")
            if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
                raise ValueError(f"{split}_y must be an int64 vector, got {_describe(y)}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{split}_x has {x.shape[0]} images but {split}_y has {y.shape[0]} labels"
                )
            if x.shape[0] == 0:
                raise ValueError(f"the {split} split is empty")
            if shape is not None and tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"train images are {shape} but test images are {tuple(x.shape[1:])}"
                )
            shape = tuple(x.shape[1:])
            lo, hi = float(x.min()), float(x.max())
            if not (lo >= 0.0 and hi <= 1.0):  # also false for NaN
                raise ValueError(f"{split}_x values must lie in [0, 1], found [{lo}, {hi}]")
            ylo, yhi = int(y.min()), int(y.max())
            if ylo < 0 or yhi >= len(self.classes):
                top = len(self.classes) - 1
                raise ValueError(f"{split}_y labels must lie in [0, {top}], found [{ylo}, {yhi}]")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and (population) standard deviation of the training images.

        For the model's input-normalisation layer: the served model takes [0, 1] pixels and
        normalises inside. Accumulated in float64 over chunks, so it is exact enough on 50k images
        without a float64 copy of the whole split.
        """
        channels = self.train_x.shape[1]
        total = torch.zeros(channels, dtype=torch.float64)
        total_sq = torch.zeros(channels, dtype=torch.float64)
        for start in range(0, self.train_x.shape[0], _CHUNK):
            chunk = self.train_x[start : start + _CHUNK].to(torch.float64)
            total += chunk.sum(dim=(0, 2, 3))
            total_sq += chunk.square().sum(dim=(0, 2, 3))
        count = self.train_x.shape[0] * self.train_x.shape[2] * self.train_x.shape[3]
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
        return tuple(mean.tolist()), tuple(std.tolist())


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
