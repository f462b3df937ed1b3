"""Model factories for the bring-your-own-model tests: code unlearnd did not write, imported by name.

``import torchvision`` at module level on purpose: that is what an operator's module does, and it
dies on a CPU-only torch unless ``daemon._torchvision``'s shim ran first (unlearnd runs it before
importing any factory module).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class TinyNet(nn.Module):
    """A small CNN with BatchNorm and a head that is not called ``classifier``."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def tiny_net(num_classes: int = 10, channels: int = 1, width: int = 4) -> nn.Module:
    return TinyNet(num_classes, channels, width)


def tiny_vit(num_classes: int = 10) -> nn.Module:
    """torchvision's VisionTransformer, one layer, for 1×28×28 (grey channel repeated to the 3 it expects)."""
    vit = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=num_classes)
    return nn.Sequential(GreyToRGB(), vit)


class GreyToRGB(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


# -- factories that are wrong, each in one way --------------------------------------------------------
NOT_CALLABLE = 42


def returns_a_dict(num_classes: int = 10) -> dict:
    return {"num_classes": num_classes}


def raises(num_classes: int = 10) -> nn.Module:
    raise RuntimeError("the factory itself is broken")


def wrong_width(num_classes: int = 10) -> nn.Module:
    """Gives num_classes + 1 logits: output not [N, classes]."""
    return TinyNet(num_classes + 1)


class _NaN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.lin = nn.Linear(1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean(dim=(1, 2, 3)).unsqueeze(1)) * float("nan")


def nan_output(num_classes: int = 10) -> nn.Module:
    return _NaN(num_classes)


class Calibrated(nn.Module):
    """A classifier whose class logits come from ``head`` but pass through a 10→10 calibration layer after it:
    found by output width, the head would be ``calibrate`` (it runs last); the operator declares ``head``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(64, num_classes)
        self.calibrate = nn.Linear(num_classes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.calibrate(self.head(self.body(x)))


def calibrated(num_classes: int = 10) -> nn.Module:
    return Calibrated(num_classes)
