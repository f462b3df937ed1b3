"""An array file as a ref source: ``.npz`` or ``.safetensors`` holding ``images`` and ``labels``.

What is accepted:

- ``images``: ``N×C×H×W`` or ``N×H×W×C`` (C is 1 or 3), or ``N×H×W`` for a 1-channel model; uint8
  (0-255, divided by 255) or float16/32/64 already in [0, 1] (an item outside [0, 1] or not finite
  is ``bad_values`` when a ref reads it). When both layouts fit (C = H = W... of 1 or 3), NCHW wins.
- ``labels``: ``N`` integers (any integer dtype), read into memory at start-up (8 bytes per item).

Lazy: the images are never read whole. A ``.npz`` is memory-mapped: its ``images.npy`` member must
be STORED, not deflated (write it with ``np.savez``, not ``np.savez_compressed``: a compressed member
cannot be mapped, and is refused at start-up with that fix); numpy's ``np.load(mmap_mode='r')``
ignores ``mmap_mode`` for ``.npz``, so the member's offset in the zip is found here and mapped with
``np.memmap``. A ``.safetensors`` file is read with ``safe_open``, one slice per item.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

from daemon.data.sources import RefError, Source, SourceConfigError

__all__ = ["ArraySource"]

_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")   # 30 bytes; the last two: name and extra lengths


class ArraySource(Source):
    """``images`` and ``labels`` of an ``.npz`` / ``.safetensors`` file; see the module docstring."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._images: object = None          # np.memmap, or a safetensors slice
        self._layout = "nchw"
        self._shape: tuple[int, int, int] = (1, 1, 1)
        self._labels = torch.empty(0, dtype=torch.int64)
        self._file: object = None            # the safe_open handle, kept open
        self.reads = 0                       # items read so far (tests assert laziness with it)

    @classmethod
    def open(cls, path: Path | str) -> ArraySource:
        """The source of ``path``; :class:`SourceConfigError` naming what is missing or wrong."""
        source = cls(path)
        source.map_file()
        return source

    def map_file(self) -> None:
        """Map the images and read the labels."""
        if not self.path.is_file():
            raise SourceConfigError(f"{self.path} is not a file")
        suffix = self.path.suffix.lower()
        if suffix == ".npz":
            images, labels = _map_npz(self.path)
        elif suffix == ".safetensors":
            images, labels, self._file = _open_safetensors(self.path)
        else:
            raise SourceConfigError(f"{self.path}: an array source is a .npz or .safetensors file")
        shape = tuple(int(d) for d in (images.shape if hasattr(images, "shape") else images.get_shape()))
        self._layout, self._shape = _layout(self.path, shape)
        labels = np.asarray(labels)
        if labels.shape != (shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise SourceConfigError(
                f"{self.path}: labels must be {shape[0]} integers (one per image), got {labels.dtype} {labels.shape}"
            )
        if shape[0] == 0:
            raise SourceConfigError(f"{self.path}: images is empty")
        self._images = images
        self._labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def item(self, index: int, shape: tuple[int, int, int]) -> torch.Tensor:
        self.reads += 1
        raw = self._images[index:index + 1]  # type: ignore[index]
        array = raw.numpy() if isinstance(raw, torch.Tensor) else np.array(raw)
        x = torch.from_numpy(array[0].copy())
        if self._layout == "nhwc":
            x = x.permute(2, 0, 1)
        x = x.reshape(self._shape)
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255.0)
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            fault = "is not in [0, 1] (or not finite)"
            raise RefError("bad_values", f"item {index} of {self.path.name} {fault}", fault=f"the item {fault}")
        return x


def _map_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            missing = [n for n in ("images", "labels") if f"{n}.npy" not in names]
            if missing:
                raise SourceConfigError(f"{path}: no {' and no '.join(missing)} array (has: "
                                        f"{', '.join(sorted(n.removesuffix('.npy') for n in names)) or 'none'})")
            info = z.getinfo("images.npy")
            with z.open("labels.npy") as f:
                labels = np.lib.format.read_array(f, allow_pickle=False)
    except zipfile.BadZipFile:
        raise SourceConfigError(f"{path} is not a .npz file (not a zip)") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise SourceConfigError(f"{path}: images is compressed and cannot be memory-mapped: save it with "
                                "np.savez, not np.savez_compressed")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
        f.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1])
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if dtype.hasobject or fortran:
        raise SourceConfigError(f"{path}: images must be a plain C-ordered numeric array")
    images = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="C")
    return images, labels


def _open_safetensors(path: Path) -> tuple[object, np.ndarray, object]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise SourceConfigError(f"{path} is not a safetensors file: {exc}") from None
    keys = set(handle.keys())
    missing = [n for n in ("images", "labels") if n not in keys]
    if missing:
        has = ", ".join(sorted(keys)) or "none"
        raise SourceConfigError(f"{path}: no {' and no '.join(missing)} tensor (has: {has})")
    labels = handle.get_tensor("labels").numpy()
    return handle.get_slice("images"), labels, handle


def _layout(path: Path, shape: tuple[int, ...]) -> tuple[str, tuple[int, int, int]]:
    if len(shape) == 3:
        return "nchw", (1, shape[1], shape[2])
    if len(shape) == 4 and shape[1] in (1, 3):
        return "nchw", (shape[1], shape[2], shape[3])
    if len(shape) == 4 and shape[3] in (1, 3):
        return "nhwc", (shape[3], shape[1], shape[2])
    raise SourceConfigError(f"{path}: images must be N×C×H×W, N×H×W×C (C 1 or 3) or N×H×W, got {shape}")
