"""Classifiers the engine unlearns, each wrapped as ``Normalize → backbone``.

Normalisation lives inside the model (a buffer, not a ``.cuda()`` constant as in the paper's code),
so every attack and every served request works in [0, 1] pixel space and a TorchScript export needs
nothing beside the weights.

Every backbone comes from a *factory*: a callable named ``"pkg.module:callable"`` plus JSON kwargs,
recorded in each version's manifest so that any process can rebuild the model. The two built-in
architectures are factories like any other (``BUILTIN_FACTORIES``); an operator's own classifier is
imported with ``unlearnd import`` (see :mod:`daemon.registry.importer`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from daemon.engine.heads import output_layer  # noqa: F401  (moved to heads.py; re-exported)

__all__ = ["BUILTIN_FACTORIES", "FactoryError", "MnistCNN", "ModelFactory", "Normalize", "build_classifier",
           "backbone_module_name", "build_model", "cifar_resnet18", "classifier_module_name", "load_factory",
           "mnist_cnn", "output_layer"]


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


def mnist_cnn(num_classes: int = 10, input_shape: Sequence[int] = (1, 28, 28)) -> nn.Module:
    """Factory ``daemon.engine.models:mnist_cnn``: the :class:`MnistCNN` for square inputs (side divisible by 4)."""
    c, h, w = tuple(input_shape)
    if h != w or h % 4:
        raise ValueError(f"mnist_cnn needs square inputs with a side divisible by 4, got {h}×{w}")
    return MnistCNN(num_classes=num_classes, in_channels=c, image_size=h)


def cifar_resnet18(num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32)) -> nn.Module:
    """Factory ``daemon.engine.models:cifar_resnet18``: torchvision's ResNet-18 with the CIFAR stem."""
    from daemon.engine.resnet import cifar_resnet18 as build

    if tuple(input_shape)[0] != 3:
        raise ValueError(f"cifar_resnet18 needs 3-channel inputs, got {tuple(input_shape)[0]}")
    return build(num_classes=num_classes)


# The built-in architectures are factories like any other; a manifest written before factories
# existed names only its ``arch``, which maps here (its kwargs: num_classes and input_shape).
BUILTIN_FACTORIES: dict[str, str] = {
    "mnist_cnn": "daemon.engine.models:mnist_cnn",
    "cifar_resnet18": "daemon.engine.models:cifar_resnet18",
}


class FactoryError(ValueError):
    """A model factory that cannot build a module; the message names the factory and the fix."""


@dataclass(frozen=True)
class ModelFactory:
    """``ref`` ("pkg.module:callable", named by the operator, never by a request) called with ``kwargs``.

    ``build()`` returns the backbone only; :func:`build_classifier` wraps it with :class:`Normalize`.
    """

    ref: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def builtin(cls, arch: str, *, num_classes: int, input_shape: Sequence[int]) -> ModelFactory:
        if arch not in BUILTIN_FACTORIES:
            raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(BUILTIN_FACTORIES))}")
        return cls(BUILTIN_FACTORIES[arch], {"num_classes": num_classes, "input_shape": list(input_shape)})

    @property
    def name(self) -> str:
        """A short name for the architecture: the callable's own name."""
        return self.ref.rpartition(":")[2].rpartition(".")[2]

    def build(self) -> nn.Module:
        factory = load_factory(self.ref)
        try:
            module = factory(**dict(self.kwargs))
        except Exception as exc:  # noqa: BLE001 - any failure of foreign code is the operator's to fix
            raise FactoryError(f"factory {self.ref} failed with kwargs {dict(self.kwargs)}: "
                               f"{type(exc).__name__}: {exc}; fix the factory or its --factory-kwargs") from exc
        if not isinstance(module, nn.Module):
            raise FactoryError(f"factory {self.ref} returned {type(module).__name__}, not a torch.nn.Module; "
                               f"it must return the classifier module")
        return module


def load_factory(ref: str) -> Callable[..., Any]:
    """The callable ``ref`` names, its module imported after the torchvision shim.

    The shim runs before every factory import: a module that imports torchvision (directly or through
    a model zoo) dies on a CPU-only torch unless it ran first (see :mod:`daemon._torchvision`).
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise FactoryError(f"factory {ref!r} must be written 'pkg.module:callable'")
    from daemon._torchvision import ensure_importable

    ensure_importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - an import error of any kind
        raise FactoryError(f"factory {ref}: module {module_name!r} does not import ({type(exc).__name__}: {exc}); "
                           f"install it or put its folder on PYTHONPATH") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactoryError(f"factory {ref}: {module_name} has no attribute {attr!r}; name a callable it defines")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"factory {ref}: {attr!r} is a {type(obj).__name__}, not callable; "
                           f"name a function or class that returns an nn.Module")
    return obj


def build_classifier(factory: ModelFactory, *, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """The classifier as ``Sequential(normalize, backbone)``, input float32 NCHW in [0, 1], output logits."""
    return nn.Sequential(Normalize(mean, std), factory.build())


def classifier_module_name(backbone_name: str) -> str:
    """A module of the operator's backbone as the wrapped classifier names it (``"fc"`` → ``"1.fc"``).

    Operators name their layers (the ``head`` setting) as their own module's ``named_modules()`` does; the
    engine sees the ``Sequential(normalize, backbone)`` that :func:`build_classifier` returns.
    """
    return f"{BACKBONE}.{backbone_name}"


def backbone_module_name(classifier_name: str) -> str | None:
    """The inverse of :func:`classifier_module_name` (None: ``classifier_name`` is not in the backbone)."""
    prefix = f"{BACKBONE}."
    return classifier_name[len(prefix):] if classifier_name.startswith(prefix) else None


BACKBONE = "1"     # build_classifier's Sequential(normalize, backbone): the backbone's index


def build_model(arch: str, *, num_classes: int, input_shape: tuple[int, int, int],
                mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """A built-in architecture through its factory (``BUILTIN_FACTORIES``)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return build_classifier(ModelFactory.builtin(arch, num_classes=num_classes, input_shape=input_shape),
                            mean=mean, std=std)
