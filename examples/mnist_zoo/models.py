"""Three torchvision classifiers adapted to MNIST (1×28×28, 10 classes): the user's own models.

This package plays the part of a team outside unlearnd: it imports torchvision directly, as any
model library would, and each factory returns a plain ``nn.Module`` that takes **normalised**
``[N, 1, 28, 28]`` inputs and returns ``[N, num_classes]`` logits. unlearnd wraps its own
``Normalize(mean, std)`` in front at import time, so the training script (``train.py``) trains
``Normalize → backbone`` the same way and saves only the backbone's ``state_dict``.

Factories (name them as ``mnist_zoo.models:<name>`` with ``examples/`` on ``PYTHONPATH``):

- :func:`resnet18`: torchvision's ResNet-18 with a 1-channel 3×3 stem; ``stem_stride`` and
  ``maxpool`` choose the resolution its stages see (default 7×7 into the first stage, the same
  proportion as 224×224 ImageNet inputs; the CIFAR layout, 28×28, is ~16× the cost).
- :func:`mobilenet_v3_small`: torchvision's MobileNetV3-Small, first conv replaced by a 1-channel
  one. The stock stem has stride 2 and the network downsamples 32× in total, so 28×28 ends at
  1×1 after ``features``; ``stem_stride=1`` (the default) ends at 2×2 instead (28 → 28 → 14 → 7 →
  4 → 2). BatchNorm, depthwise convolutions, squeeze-excitation and hard-swish: a model that is
  nothing like the MNIST CNN.
- :func:`vit_tiny`: torchvision's ``VisionTransformer`` with ``image_size=28`` and a 1-channel
  patch projection; ``patch_size`` must divide 28 (7 gives 16 tokens, 4 gives 49).

Importing torchvision on these machines: the CPU build of torch lacks the operators torchvision's
CUDA wheel registers, so a bare ``import torchvision`` dies with ``operator torchvision::nms does not
exist``. ``unlearnd import`` (and everything that rebuilds a model from its manifest) runs unlearnd's
shim (``daemon._torchvision.import_torchvision()``) before importing a factory module, so the plain
``import torchvision`` below just works there. Standalone scripts (``train.py``, a notebook) must
run the shim first themselves; see ``README.md``.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

__all__ = ["FACTORIES", "count_parameters", "mobilenet_v3_small", "resnet18", "vit_tiny"]


def resnet18(num_classes: int = 10, in_channels: int = 1, stem_stride: int = 2, maxpool: bool = True) -> nn.Module:
    """torchvision ResNet-18 (11.2 M parameters) with a 3×3 ``in_channels`` stem for 28×28 inputs.

    The ImageNet stem (7×7 stride 2, then a max-pool) suits 224×224; here a 3×3 conv with
    ``stem_stride`` and the optional max-pool decide the resolution the four stages see. The default
    (stride 2 + max-pool: 28 → 14 → 7, then 7 → 4 → 2 → 1) is the cheapest and the only one that
    trains in minutes on a 2-core CPU; ``stem_stride=1, maxpool=False`` (the CIFAR layout, 28×28 into
    the first stage) costs about 16× the FLOPs (see ``README.md`` for the measured step times).
    BasicBlock ResNets fix their width at 64 in torchvision, so there is no width knob.
    """
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
    if not maxpool:
        model.maxpool = nn.Identity()
    return model


def mobilenet_v3_small(num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0,
                       stem_stride: int = 1, bn_momentum: float = 0.1) -> nn.Module:
    """torchvision MobileNetV3-Small with its first conv replaced by an ``in_channels`` one.

    ``stem_stride=1`` keeps 28×28 at 2×2 at the end of ``features`` instead of 1×1 (the stock 2).
    ``width_mult`` scales every layer (torchvision rounds channels to multiples of 8).
    ``bn_momentum``: torchvision builds MobileNetV3's BatchNorm with momentum 0.01, made for
    ImageNet's long schedules; after a few hundred steps the running statistics are still near their
    initial values and the model in eval mode is at chance (measured: 9.7% test accuracy after 234
    steps with train loss 0.25). 0.1 (PyTorch's default) lets a short run's statistics catch up.
    """
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
    model = torchvision.models.mobilenet_v3_small(num_classes=num_classes, width_mult=width_mult)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, kernel_size=3, stride=stem_stride,
                                     padding=1, bias=False)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = bn_momentum
    return model


def vit_tiny(num_classes: int = 10, in_channels: int = 1, patch_size: int = 7, num_layers: int = 4,
             num_heads: int = 4, hidden_dim: int = 64, mlp_dim: int = 128) -> nn.Module:
    """A small torchvision ``VisionTransformer`` for 28×28 inputs (class token, LayerNorm, attention).

    torchvision's patch projection is ``Conv2d(3, hidden_dim, patch, stride=patch)``; it is replaced
    by an ``in_channels`` one with the same initialisation (truncated-normal fan-in, as torchvision's).
    """
    if 28 % patch_size:
        raise ValueError(f"patch_size must divide 28, got {patch_size}")
    model = torchvision.models.VisionTransformer(
        image_size=28, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
        hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes,
    )
    proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
    fan_in = in_channels * patch_size * patch_size
    nn.init.trunc_normal_(proj.weight, std=(1.0 / fan_in) ** 0.5)
    nn.init.zeros_(proj.bias)
    model.conv_proj = proj
    return model


FACTORIES = {"resnet18": resnet18, "mobilenet_v3_small": mobilenet_v3_small, "vit_tiny": vit_tiny}


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters together (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # a quick look: python -m mnist_zoo.models (after the shim, see README)
    for name, factory in FACTORIES.items():
        net = factory().eval()
        with torch.no_grad():
            print(name, count_parameters(net), tuple(net(torch.zeros(2, 1, 28, 28)).shape))
