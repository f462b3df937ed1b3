"""ResNet-18 with the CIFAR stem, the backbone the paper's CIFAR-10 experiments use.

torchvision's ResNet-18 is built for 224×224 ImageNet inputs: a 7×7 stride-2 first convolution and
a stride-2 max-pool shrink a 32×32 image to 8×8 before the first residual block, which costs a lot
of accuracy on CIFAR. The usual CIFAR variant (He et al. 2016, §4.2; the "kuangliu" ResNet-18 that
unlearning papers train) keeps full resolution: a 3×3 stride-1 first convolution and no max-pool.

This is the backbone only: it expects inputs already normalised. The model wrapper adds the
normalisation layer (from ``DatasetSplits.mean_std()``), so that the served model takes [0, 1]
pixels, as the contract (§4) requires.

Note the cost on CPU (``notes/environment.md`` §5): about 2.9 s per batch of 128 to train, so keep
it to demos and small runs. torchvision is imported only through :mod:`daemon._torchvision`.
"""

from __future__ import annotations

from torch import nn

from daemon._torchvision import import_torchvision

__all__ = ["cifar_resnet18"]


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ``resnet18`` (random init, nothing downloaded) with the CIFAR stem.

    Shape: input ``N×3×H×W`` normalised (any H, W ≥ 8; 32×32 for CIFAR), output ``N×num_classes``
    logits.

    Example::

        model = cifar_resnet18(num_classes=10)
        logits = model(torch.randn(2, 3, 32, 32))  # 2×10
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    models = import_torchvision().models
    model: nn.Module = models.resnet18(weights=None, num_classes=num_classes)
    conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # The same initialisation torchvision's ResNet gives every convolution.
    nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
    model.conv1 = conv1
    model.maxpool = nn.Identity()
    return model
