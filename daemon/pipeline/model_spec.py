"""What intake knows about one live model: its input shape, its classes and the sources its refs name.

Its own module because the codec's two stages and the runtime that builds it all read it, and nothing of
theirs is needed to check it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from daemon.data.sources import RefError, Source, parse_ref

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """What intake knows about one live model: its input, its classes and its ref sources.

    ``sources`` maps a source name (``"mnist-train"``) to ``(images N×C×H×W float in [0, 1],
    labels N)``; it is copied into a read-only mapping. Every source must match ``input_shape``.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    sources: Mapping[str, Source] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a model name must be a non-empty string, got {self.name!r}")
        shape = tuple(self.input_shape) if isinstance(self.input_shape, (tuple, list)) else None
        if shape is None or len(shape) != 3 or not all(type(d) is int and d > 0 for d in shape):
            raise ValueError(
                f"model {self.name!r}: input_shape must be (C, H, W) of positive integers, "
                f"got {self.input_shape!r}"
            )
        if type(self.num_classes) is not int or self.num_classes < 1:
            raise ValueError(
                f"model {self.name!r}: num_classes must be a positive integer, "
                f"got {self.num_classes!r}"
            )
        if not isinstance(self.sources, Mapping):
            raise ValueError(
                f"model {self.name!r}: sources must be a mapping of name to (images, labels)"
            )
        for source, pair in self.sources.items():
            _check_source(self.name, source, pair, shape)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))


def _check_source(model: str, source: object, pair: object, shape: tuple[int, ...]) -> None:
    where = f"model {model!r}, source {source!r}"
    try:
        named = parse_ref(f"{source}:0")[0] if isinstance(source, str) else None
    except RefError:
        named = None
    if named != source:
        raise ValueError(
            f"{where}: a source name is letters, digits, '.', '_' and '-' (refs could not name it)"
        )
    if not isinstance(pair, tuple) or len(pair) != 2:
        raise ValueError(f"{where}: a source is a pair (images, labels)")
    x, y = pair
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where}: images must be N×{'×'.join(map(str, shape))}, got {got}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{where}: images must be floating point in [0, 1], got {x.dtype}")
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (x.shape[0],):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{where}: need one label per image ({x.shape[0]}), got {got}")
