"""Content hashes: one digest per instance *as the model sees it*, so a forgotten instance can be found in a source.

The ledger has always kept a hash of each forgotten instance's *id*; an id says nothing about which item of a
training source the instance is, so it cannot tell a rebase (a retrain on the source minus what was
forgotten) what to leave out. The content hash can: it is the SHA-256 of the instance's shape and its pixels
quantised to 8 bits (``round(x * 255)``), so the same digit hashes the same whether a request sent it inline as
a PNG (8-bit already), as ``.npy`` floats, or named it by ``ref`` to the source item — and a source's items
hash the same way when a rebase lists them. Quantising is what makes PNG and the float source agree; two
inputs that differ by less than half a grey level are the same instance to it, which is the point.

Only the digest is kept (never the pixels); it is a hash like the ids' (contract: hashes only). With the
daemon's id key (:mod:`daemon.keys`) the digest is an HMAC-SHA256 (``hmac-sha256:<key id>:<hex>``): a plain
hash of a known image would tell whoever reads the ledger whether that image was forgotten (issue 23). A rebase
hashes its source under the same key, so exclusion stays exact; a digest without the prefix is a plain SHA-256
from before keyed hashes, and :func:`source_hashes` can give those too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from daemon import keys
from daemon.data.sources import Source

__all__ = ["content_sha256", "content_sha256_rows", "source_hashes"]

_CHUNK = 4096       # rows quantised at once when a source is hashed (MNIST train: ~15 chunks, a few MB each)


def _header(shape: Sequence[int]) -> bytes:
    return ("x".join(str(int(d)) for d in shape) + "\n").encode("ascii")


def _quantised(x: torch.Tensor) -> tuple[bytes, np.ndarray]:
    if x.dim() != 4:
        raise ValueError(f"content hashes take N×C×H×W, got {tuple(x.shape)}")
    q = np.rint(x.detach().cpu().to(torch.float64).clamp(0.0, 1.0).numpy() * 255.0).astype(np.uint8)
    return _header(x.shape[1:]), q.reshape(q.shape[0], -1)


def content_sha256_rows(x: torch.Tensor, key: keys.SecretKey | None = None) -> list[str]:
    """The content hash of each row of ``x`` (``N×C×H×W`` floats in [0, 1]): keyed with ``key`` when given."""
    header, q = _quantised(x)
    if key is None:
        return [hashlib.sha256(header + row.tobytes()).hexdigest() for row in q]
    return [keys.keyed_digest(key, b"unlearnd.content", header + row.tobytes()) for row in q]


def content_sha256(x: torch.Tensor, key: keys.SecretKey | None = None) -> str:
    """The content hash of one instance (``C×H×W`` floats in [0, 1]): keyed with ``key`` when given."""
    if x.dim() != 3:
        raise ValueError(f"a content hash takes one C×H×W instance, got {tuple(x.shape)}")
    return content_sha256_rows(x.unsqueeze(0), key)[0]


def source_hashes(source: Source, indices: Sequence[int], shape: tuple[int, int, int],
                  key: keys.SecretKey | None = None, *, plain_too: bool = False) -> Iterator[tuple[int, list[str]]]:
    """(index, its content hashes) of each of ``indices``, read and hashed in chunks (a source is never held
    whole): the keyed hash under ``key`` (else the plain one), and with ``plain_too`` the plain SHA-256 as well
    (what rows written before keyed hashes hold)."""
    indices = list(indices)
    for start in range(0, len(indices), _CHUNK):
        chunk = indices[start:start + _CHUNK]
        x = source.items(chunk, shape)
        digests = [content_sha256_rows(x, key)]
        if plain_too and key is not None:
            digests.append(content_sha256_rows(x))
        yield from zip(chunk, [list(d) for d in zip(*digests, strict=True)], strict=True)
