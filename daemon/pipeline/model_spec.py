"""What intake knows about one live model: its input shape, its classes and the sources its refs name.

Its own module because the codec's two stages and the runtime that builds it all read it, and nothing of
theirs is needed to check it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from daemon.data.sources import Source, TensorSource, check_source_name

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """What intake knows about one live model: its input, its classes and its ref sources.

    ``sources`` maps a source name (``"mnist-train"``, ``"photos"``) to a
    :class:`~daemon.data.sources.Source` (or, for tests and built-ins, a pair ``(images N×C×H×W
    float in [0, 1], labels N)``, wrapped in a :class:`~daemon.data.sources.TensorSource`); it is
    copied into a read-only mapping. Every source must be able to feed ``input_shape``.
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
            raise ValueError(f"model {self.name!r}: sources must be a mapping of name to Source")
        sources = {name: _check_source(self.name, name, src, shape) for name, src in self.sources.items()}
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "sources", MappingProxyType(sources))


def _check_source(model: str, name: object, source: object, shape: tuple[int, ...]) -> Source:
    where = f"model {model!r}, source {name!r}"
    if not check_source_name(name):
        raise ValueError(
            f"{where}: a source name is letters, digits, '.', '_' and '-' (refs could not name it)"
        )
    if isinstance(source, tuple):
        if len(source) != 2:
            raise ValueError(f"{where}: a source is a Source or a pair (images, labels)")
        x = source[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape:
            got = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"{where}: images must be N×{'×'.join(map(str, shape))}, got {got}")
        try:
            source = TensorSource(*source)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if not isinstance(source, Source):
        raise ValueError(f"{where}: a source is a Source or a pair (images, labels), got {type(source).__name__}")
    why = source.accepts(shape)  # type: ignore[arg-type]
    if why is not None:
        raise ValueError(f"{where} cannot feed the model: {why}")
    return source
