"""An image folder as a ref source: class subfolders, as torchvision's ``ImageFolder`` lays them out.

``root/<class>/.../<file>``: the class folders, sorted by name, are the classes 0, 1, ...; within a
class its image files (extensions as torchvision's ``IMG_EXTENSIONS``, any case, in nested folders
too) sorted by relative path; items are numbered class after class. Files directly under the root
and hidden folders (``.name``) are not items.

Lazy: opening the source lists the folder once (names only: one path string per file, no file is
opened), so a ref by index or by path (``photos:cats/001.png``) costs a lookup in that listing and
one file read. The listing is taken at start-up: a file added later is ``ref_not_found`` until the
daemon restarts.

Every read checks that the file's real path (symlinks followed) stays under the root's real path,
so a symlink out of the root is ``ref_outside_source``, by index as by path. Pixels: the file is
decoded with Pillow, converted to grey (``L``) for a 1-channel model or ``RGB`` for a 3-channel one,
and divided by 255. A size other than the model's is ``wrong_shape`` unless the operator asked for
``resize`` (bilinear, to the model's H×W); a file Pillow cannot read is ``bad_image``.
"""

from __future__ import annotations

import bisect
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from daemon.data.sources import RefError, Source, SourceConfigError

__all__ = ["IMG_EXTENSIONS", "MAX_FILE_BYTES", "ImageFolderSource"]

#: torchvision's ImageFolder extensions (compared lower-case)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: a file larger than this is not read (a decompression bomb or not an image at all)
MAX_FILE_BYTES = 64 << 20
_MODES = {1: "L", 3: "RGB"}


def _open_binary(path: Path) -> BinaryIO:
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


class ImageFolderSource(Source):
    """Class subfolders of images under ``root``; see the module docstring for the layout and rules.

    ``opener`` opens one file for reading (injected: tests count the files a ref opens).
    """

    def __init__(self, root: Path | str, *, resize: bool = False,
                 opener: Callable[[Path], BinaryIO] = _open_binary) -> None:
        self.root = Path(root)
        self.resize = resize
        self.opener = opener
        self.classes: list[str] = []
        self._files: list[list[str]] = []       # per class, paths relative to the class folder, sorted
        self._starts: list[int] = []            # per class, the index of its first item
        self._labels = torch.empty(0, dtype=torch.int64)
        self._real_root = ""

    @classmethod
    def open(cls, root: Path | str, *, resize: bool = False,
             opener: Callable[[Path], BinaryIO] = _open_binary) -> ImageFolderSource:
        """The source of ``root``, listed (names only); :class:`SourceConfigError` if missing or empty."""
        source = cls(root, resize=resize, opener=opener)
        source.list_files()
        return source

    def list_files(self) -> None:
        """Take the sorted listing (no file is opened)."""
        if not self.root.is_dir():
            raise SourceConfigError(f"{self.root} is not a folder (give the folder holding one folder per class)")
        self._real_root = os.path.realpath(self.root)
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        files = [_images_under(self.root / c) for c in classes]
        if not any(files):
            raise SourceConfigError(
                f"{self.root} holds no images in class folders (expected <root>/<class>/<file> "
                f"with an extension among {', '.join(IMG_EXTENSIONS)})"
            )
        self.classes, self._files = classes, files
        sizes = [len(f) for f in files]
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        self._labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(sizes))

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    @property
    def image_shape(self) -> None:
        return None

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def accepts(self, shape: tuple[int, int, int]) -> str | None:
        if shape[0] not in _MODES:
            return f"an image folder feeds 1-channel (grey) or 3-channel (RGB) models, not {shape[0]} channels"
        return None

    def relative_path(self, index: int) -> str:
        """The path of item ``index`` relative to the root (``cats/001.png``)."""
        label = bisect.bisect_right(self._starts, index) - 1
        return f"{self.classes[label]}/{self._files[label][index - self._starts[label]]}"

    def index_of(self, path: str) -> int:
        cls_name, _, rest = path.partition("/")
        label = bisect.bisect_left(self.classes, cls_name)
        if label < len(self.classes) and self.classes[label] == cls_name:
            files = self._files[label]
            at = bisect.bisect_left(files, rest)
            if at < len(files) and files[at] == rest:
                self._check_inside(path)
                return self._starts[label] + at
        self._check_inside(path)  # a symlinked class folder out of the root says so, not "not found"
        raise _fault("ref_not_found", path, "is not an image of this folder source (listed at start-up)")

    def _check_inside(self, path: str) -> Path:
        full = self.root / path
        real = os.path.realpath(full)
        if os.path.commonpath([real, self._real_root]) != self._real_root:
            raise _fault("ref_outside_source", path, "leads out of the source's root (a symlink)")
        return full

    def item(self, index: int, shape: tuple[int, int, int]) -> torch.Tensor:
        path = self.relative_path(index)
        full = self._check_inside(path)
        try:
            with self.opener(full) as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            raise _fault("ref_not_found", path, "was listed at start-up but is gone") from None
        except OSError as exc:
            raise _fault("bad_image", path, f"cannot be read: {exc.strerror}") from None
        if len(raw) > MAX_FILE_BYTES:
            raise _fault("bad_image", path, f"is over {MAX_FILE_BYTES >> 20} MiB: not read")
        return _decode(path, raw, shape, self.resize)


def _fault(reason: str, path: str, fault: str) -> RefError:
    """A :class:`RefError` about the file at ``path``; its ``fault`` does not name the file."""
    return RefError(reason, f"{path!r} {fault}", fault=f"the file {fault}")


def _images_under(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        for name in filenames:
            if name.lower().endswith(IMG_EXTENSIONS):
                out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(out)


def _decode(path: str, raw: bytes, shape: tuple[int, int, int], resize: bool) -> torch.Tensor:
    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.size != (width, height):
                if not resize:
                    raise _fault(
                        "wrong_shape", path,
                        f"is {image.size[0]}×{image.size[1]} (W×H), the model takes {width}×{height}: "
                        "resize the images, or set resize = true on the source",
                    )
                image.draft(_MODES[channels], (width, height))
            image = image.convert(_MODES[channels])
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except RefError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _fault("bad_image", path, f"is not a readable image ({type(exc).__name__})") from None
    x = torch.from_numpy(pixels.copy()).to(torch.float32).div_(255.0)
    return x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1).contiguous()
