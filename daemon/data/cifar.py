"""CIFAR-10 from a folder in torchvision's on-disk format; nothing is ever downloaded.

No wheel on the package index carries CIFAR-10 (``notes/environment.md`` §4), and these machines
have no network, so the operator brings the data: on a machine with network,
``torchvision.datasets.CIFAR10(root, download=True)`` writes ``<root>/cifar-10-batches-py/`` (the
"python version" of the dataset from https://www.cs.toronto.edu/~kriz/cifar.html), and that folder
is copied here. ``root`` may be the folder that holds ``cifar-10-batches-py`` or that folder itself.

torchvision_compatible: the same files, the same order and the same labels as
``torchvision.datasets.CIFAR10``: train is ``data_batch_1`` … ``data_batch_5`` in order (50,000
images), test is ``test_batch`` (10,000), class names come from ``batches.meta``. So
``cifar10-train:<i>`` is ``torchvision.datasets.CIFAR10(root, train=True)[i]``.

The batch files are pickles, and pickle can run code; they are read with an unpickler that admits
only what they contain (builtin containers, and numpy's array and dtype reconstructors), so a
tampered file fails with :class:`pickle.UnpicklingError` instead of running anything.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from daemon.data._safe_pickle import load_arrays
from daemon.data.splits import DatasetSplits

__all__ = ["CIFAR10_FOLDER", "load_cifar10"]

CIFAR10_FOLDER = "cifar-10-batches-py"
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"
_META_FILE = "batches.meta"
_ROWS_PER_FILE = 10_000
_PIXELS = 3 * 32 * 32
_NUM_CLASSES = 10
_HOW_TO_GET = (
    "get it on a machine with network with "
    "`python -c \"import torchvision; torchvision.datasets.CIFAR10('DIR', download=True)\"` "
    f"and copy DIR/{CIFAR10_FOLDER} here (nothing is downloaded at run time)"
)

def load_cifar10(root: Path, *, expect_full: bool = True) -> DatasetSplits:
    """Read CIFAR-10 from ``root`` as float32 ``N×3×32×32`` in [0, 1] and int64 labels.

    Arguments:
        root: the folder holding ``cifar-10-batches-py``, or that folder itself.
        expect_full: require exactly 10,000 images per batch file (50,000 train, 10,000 test).
            Only tests pass ``False``, to read small files in the same format.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (says how to get the data).
        ValueError: a file is readable but not CIFAR-10 (wrong keys, shapes, dtypes or labels).
        pickle.UnpicklingError: a file asks for anything but builtin containers and numpy arrays.
    """
    folder = _find_folder(Path(root))
    names = _class_names(folder / _META_FILE)
    train = [_read_batch(folder / name, expect_full) for name in _TRAIN_FILES]
    test_x, test_y = _read_batch(folder / _TEST_FILE, expect_full)
    return DatasetSplits(
        name="cifar10",
        train_x=_to_images(np.concatenate([x for x, _ in train])),
        train_y=torch.from_numpy(np.concatenate([y for _, y in train])),
        test_x=_to_images(test_x),
        test_y=torch.from_numpy(test_y),
        classes=names,
    )


def _find_folder(root: Path) -> Path:
    for candidate in (root / CIFAR10_FOLDER, root):
        named = candidate.name == CIFAR10_FOLDER and candidate.is_dir()
        if named or (candidate / _META_FILE).is_file():
            break
    else:
        hint = ""
        if (root / "cifar-10-python.tar.gz").is_file():
            hint = f" ({root / 'cifar-10-python.tar.gz'} is there: extract it with tar xzf)"
        raise FileNotFoundError(f"no CIFAR-10 folder {root / CIFAR10_FOLDER}{hint}; {_HOW_TO_GET}")
    missing = [n for n in (*_TRAIN_FILES, _TEST_FILE, _META_FILE) if not (candidate / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 folder {candidate} lacks {', '.join(missing)}; {_HOW_TO_GET}"
        )
    return candidate


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as fh:
            # latin1, as torchvision reads them: the original files are Python 2 pickles.
            content = load_arrays(fh, f"the CIFAR-10 file {path.name}")
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{path}: {exc}") from exc
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ValueError(f"{path} is not a readable CIFAR-10 pickle: {exc}; {_HOW_TO_GET}") from exc
    if not isinstance(content, dict):
        raise ValueError(f"{path} should hold a dict, found {type(content).__name__}")
    return content


def _field(content: dict[Any, Any], key: str, path: Path) -> Any:  # a pickled value of any type
    # Python 2 files read as latin1 have str keys; files re-saved from an encoding="bytes" load
    # have bytes keys. Accept both.
    for candidate in (key, key.encode("ascii")):
        if candidate in content:
            return content[candidate]
    raise ValueError(f"{path} has no {key!r} entry (found {sorted(map(repr, content))})")


def _class_names(path: Path) -> tuple[str, ...]:
    raw = _field(_unpickle(path), "label_names", path)
    if not isinstance(raw, (list, tuple)) or len(raw) != _NUM_CLASSES:
        raise ValueError(f"{path}: label_names should list {_NUM_CLASSES} names, got {raw!r:.200}")
    names = []
    for item in raw:
        if isinstance(item, bytes):
            item = item.decode("utf-8", errors="replace")
        if not isinstance(item, str) or not item:
            raise ValueError(f"{path}: label_names holds {item!r}, not a name")
        names.append(item)
    return tuple(names)


def _read_batch(path: Path, expect_full: bool) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path)
    data = _field(content, "data", path)
    labels = _field(content, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: data should be a uint8 N×{_PIXELS} array, got {_describe(data)}")
    rows = data.shape[0]
    if data.shape[1] != _PIXELS:
        raise ValueError(
            f"{path}: data rows should hold {_PIXELS} bytes (3×32×32), got {data.shape[1]}"
        )
    if expect_full and rows != _ROWS_PER_FILE:
        raise ValueError(
            f"{path}: expected {_ROWS_PER_FILE} images, found {rows}; the file is truncated"
        )
    if rows == 0:
        raise ValueError(f"{path} holds no images")
    try:
        y = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: labels should be a list of integers: {exc}") from exc
    if y.shape != (rows,) or y.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels should be {rows} integers, got {_describe(y)}")
    if int(y.min()) < 0 or int(y.max()) >= _NUM_CLASSES:
        raise ValueError(
            f"{path}: labels should lie in [0, 9], found [{int(y.min())}, {int(y.max())}]"
        )
    return data, y.astype(np.int64)


def _to_images(rows: np.ndarray) -> torch.Tensor:
    # Each row is the red plane, then green, then blue, each 32×32 row-major: exactly C×H×W.
    return torch.from_numpy(rows.reshape(-1, 3, 32, 32)).to(torch.float32).div_(255.0)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
