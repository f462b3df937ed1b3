"""Inline instance data: ``{"format": "png" | "npy", "b64": "..."}`` to a ``C×H×W`` tensor in [0,1].

Contract §2 lets a request carry the raw input instead of a ref. This input comes from outside, so
decoding is strict and bounded, and every failure is an :class:`InlineDataError` whose ``reason``
becomes the DLQ ``error.reason``:

- ``bad_format``: not a ``{"format", "b64"}`` object, or a format other than png / npy;
- ``bad_base64``: ``b64`` is not a base64 string;
- ``bad_image``: the bytes are not a readable PNG / ``.npy`` file;
- ``wrong_shape``: the size or channel count differs from the model's input (nothing is resized);
- ``bad_values``: an ``.npy`` dtype other than uint8 or float, or floats outside [0, 1] or not
  finite.

PNG: 8-bit greyscale (mode ``L``, or 1-bit) for 1-channel models, RGB (or a palette without
transparency) for 3-channel models; pixels are divided by 255. ``.npy``: shapes ``H×W`` (1 channel
only), ``C×H×W`` or ``1×C×H×W``; uint8 is divided by 255, floats are taken as they are. The
``.npy`` header is read and checked before any data, and pickled (object) arrays are refused, so a
hostile header cannot make us allocate or execute anything. A PNG's size is checked before its
pixels are decompressed, for the same reason.

PNG is 8-bit, so ``encode_png`` quantises; ``encode_npy`` of a float32 tensor round-trips exactly.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["INLINE_FORMATS", "InlineDataError", "decode_inline", "encode_npy", "encode_png"]

INLINE_FORMATS = ("png", "npy")
_WHITESPACE = re.compile(rb"\s+")
_NPY_MAGIC = b"\x93NUMPY"
_DEEP_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


class InlineDataError(ValueError):
    """Inline data that cannot become a model input; ``reason`` is a short snake_case code.

    Reasons: ``bad_base64``, ``bad_format``, ``bad_image``, ``wrong_shape``, ``bad_values``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_inline(data: object, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Decode an instance's ``data`` object to a float32 ``C×H×W`` tensor with values in [0, 1]."""
    channels, height, width = _check_shape(input_shape)
    if not isinstance(data, Mapping):
        raise InlineDataError("bad_format", f"data must be an object, got {type(data).__name__}")
    keys = set(data)
    if keys != {"format", "b64"}:
        found = sorted(map(str, keys))
        raise InlineDataError(
            "bad_format", f"data must have exactly the keys format and b64, got {found}"
        )
    fmt = data["format"]
    if not isinstance(fmt, str) or fmt not in INLINE_FORMATS:
        raise InlineDataError(
            "bad_format", f"format must be one of {', '.join(INLINE_FORMATS)}, got {fmt!r:.40}"
        )
    raw = _b64decode(data["b64"])
    if fmt == "png":
        return _decode_png(raw, channels, height, width)
    return _decode_npy(raw, channels, height, width)


def encode_png(x: torch.Tensor) -> str:
    """Base64 of an 8-bit PNG of a ``C×H×W`` (or ``1×C×H×W``) tensor in [0, 1], C = 1 or 3."""
    arr = _as_chw_array(x)
    if arr.shape[0] not in (1, 3):
        raise ValueError(f"a PNG holds 1 or 3 channels, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
        raise ValueError("encode_png needs values in [0, 1]")
    pixels = np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    if pixels.shape[0] == 1:
        image = Image.fromarray(pixels[0])  # mode L
    else:
        image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))  # mode RGB
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_npy(x: torch.Tensor | np.ndarray) -> str:
    """Base64 of a ``.npy`` file of ``x``, with its shape and dtype unchanged."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(arr), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if (
        not isinstance(input_shape, (tuple, list))
        or len(input_shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)
    ):
        raise ValueError(f"input_shape must be (C, H, W) of positive integers, got {input_shape!r}")
    c, h, w = input_shape
    return c, h, w


def _b64decode(text: object) -> bytes:
    if not isinstance(text, str):
        raise InlineDataError("bad_base64", f"b64 must be a string, got {type(text).__name__}")
    try:
        # Line-wrapped (MIME) base64 is common; anything else outside the alphabet is an error.
        return base64.b64decode(_WHITESPACE.sub(b"", text.encode("ascii")), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise InlineDataError("bad_base64", f"b64 is not valid base64: {exc}") from exc


def _decode_png(raw: bytes, channels: int, height: int, width: int) -> torch.Tensor:
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        SyntaxError,
    ) as exc:
        # Pillow reports a bad file with any of these, depending on where the file goes wrong.
        raise InlineDataError("bad_image", f"not a readable PNG: {exc}") from exc
    with image:
        if image.size != (width, height):
            raise InlineDataError(
                "wrong_shape",
                f"PNG is {image.width}×{image.height}, the model takes {width}×{height}",
            )
        target = "L" if channels == 1 else "RGB" if channels == 3 else None
        if target is None:
            raise InlineDataError(
                "wrong_shape", f"PNG holds 1 or 3 channels, the model takes {channels}"
            )
        accepted = {"L": ("L", "1"), "RGB": ("RGB", "P")}[target]
        if image.mode not in accepted or (image.mode == "P" and "transparency" in image.info):
            kind = "an 8-bit greyscale" if target == "L" else "an RGB"
            # Same channels, other bit depth (16-bit, float): a format problem, not a shape one.
            reason = (
                "bad_image" if target == "L" and image.mode in _DEEP_GREY_MODES else "wrong_shape"
            )
            raise InlineDataError(
                reason,
                f"the model takes {channels}-channel input: send {kind} PNG, got mode {image.mode}",
            )
        try:
            image.load()
            pixels = np.array(image.convert(target), dtype=np.uint8)  # a writable copy
        except (OSError, ValueError, SyntaxError) as exc:
            raise InlineDataError("bad_image", f"PNG is damaged: {exc}") from exc
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # H×W(×3) to C×H×W
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32).div_(255.0)


def _decode_npy(raw: bytes, channels: int, height: int, width: int) -> torch.Tensor:
    if not raw.startswith(_NPY_MAGIC):
        raise InlineDataError("bad_image", "not a .npy file (no \\x93NUMPY magic)")
    fh = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {version[0]}.{version[1]}")
    except (ValueError, EOFError, TypeError, SyntaxError) as exc:
        raise InlineDataError("bad_image", f"not a readable .npy file: {exc}") from exc
    accepted = {(channels, height, width), (1, channels, height, width)}
    if channels == 1:
        accepted.add((height, width))
    if tuple(shape) not in accepted:
        raise InlineDataError(
            "wrong_shape",
            f"array shape {tuple(shape)} does not fit the model input {(channels, height, width)}",
        )
    is_uint8 = dtype == np.dtype(np.uint8)
    if not is_uint8 and dtype.kind != "f":
        raise InlineDataError(
            "bad_values",
            f"array dtype {dtype} not accepted: send uint8 (0..255) or float in [0, 1]",
        )
    body = raw[fh.tell() :]
    expected = math.prod(shape) * dtype.itemsize
    if len(body) != expected:
        raise InlineDataError(
            "bad_image", f".npy data is {len(body)} bytes, its header says {expected}"
        )
    arr = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    arr = arr.reshape(channels, height, width)
    if is_uint8:
        return torch.from_numpy(arr.astype(np.float32)).div_(255.0)
    values = arr.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise InlineDataError("bad_values", "array holds NaN or infinite values")
    if values.min() < 0.0 or values.max() > 1.0:
        lo, hi = values.min(), values.max()
        raise InlineDataError(
            "bad_values", f"float values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]"
        )
    return torch.from_numpy(values.astype(np.float32))


def _as_chw_array(x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a C×H×W (or 1×C×H×W) image, got shape {arr.shape}")
    return arr
