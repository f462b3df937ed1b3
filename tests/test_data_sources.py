"""Folder and array sources: numbering, refs by index and by path, laziness, and every bad file or path."""

from __future__ import annotations

import os
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from daemon.data.arrays import ArraySource
from daemon.data.folder import ImageFolderSource
from daemon.data.sources import RefError, SourceConfigError, TensorSource, parse_ref, resolve_refs
from daemon.pipeline.model_spec import ModelSpec

CLASSES = ("ant", "bee", "cat")


def _png(path: Path, value: int, size: tuple[int, int] = (4, 4), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, colour).save(path)


class Counting:
    """An opener that records every file a source opens."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    def __call__(self, path: Path):  # noqa: ANN204 - a binary file
        self.opened.append(str(path))
        return open(path, "rb")  # noqa: SIM115


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 tiny PNGs in three class folders (pixel value = the file's number within its class, mod 256)."""
    root = tmp_path_factory.mktemp("photos")
    for c in CLASSES:
        for n in range(1000):
            _png(root / c / f"{n:04d}.png", n % 256)
    (root / "notes.txt").write_text("not an item")          # files at the root are not items
    (root / "cat" / "readme.md").write_text("not an image")  # nor files without an image extension
    return root


def test_a_folder_is_listed_without_opening_a_file_and_a_ref_opens_only_its_file(big_folder):
    opener = Counting()
    source = ImageFolderSource.open(big_folder, opener=opener)
    assert opener.opened == [] and len(source) == 3000 and source.classes == list(CLASSES)
    assert source.labels.tolist() == [0] * 1000 + [1] * 1000 + [2] * 1000
    assert source.relative_path(1000) == "bee/0000.png" and source.relative_path(2999) == "cat/0999.png"

    x, y = resolve_refs(["photos:1300", "photos:cat/0042.png", "photos:ant/0007.png"], {"photos": source},
                        (1, 4, 4))
    assert [Path(p).relative_to(big_folder).as_posix() for p in opener.opened] == [
        "bee/0300.png", "cat/0042.png", "ant/0007.png"]
    assert y.tolist() == [1, 2, 0]
    assert torch.equal(x, torch.tensor([300 % 256, 42, 7]).float().div(255).view(3, 1, 1, 1).expand(3, 1, 4, 4))
    assert source.index_of("cat/0042.png") == 2042


def test_folder_numbering_follows_imagefolder(tmp_path):
    for rel in ("b/z.png", "b/a.png", "a/sub/y.PNG", "a/x.jpg", "a-b/q.png", ".hidden/h.png", "a/.git/g.png"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (2, 2)).save(p, format="PNG")
    source = ImageFolderSource.open(tmp_path)
    assert source.classes == ["a", "a-b", "b"]
    assert [source.relative_path(i) for i in range(len(source))] == [
        "a/sub/y.PNG", "a/x.jpg", "a-b/q.png", "b/a.png", "b/z.png"]
    assert [source.index_of(source.relative_path(i)) for i in range(len(source))] == list(range(5))


def test_path_refs_never_leave_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _png(root / "cat" / "1.png", 10)
    _png(outside / "secret.png", 99)
    os.symlink(outside / "secret.png", root / "cat" / "2.png")
    os.symlink(outside, root / "dog")
    opener = Counting()
    source = ImageFolderSource.open(root, opener=opener)
    sources = {"p": source}
    for ref in ("p:cat/../../outside/secret.png", "p:/etc/passwd.png", "p:cat//1.png", "p:./cat/1.png"):
        with pytest.raises(RefError) as info:
            resolve_refs([ref], sources, (1, 4, 4))
        assert info.value.reason == "ref_outside_source", ref
    for ref in ("p:cat/2.png", "p:dog/secret.png", "p:1", "p:2"):   # symlinks out, by path and by index
        with pytest.raises(RefError) as info:
            resolve_refs([ref], sources, (1, 4, 4))
        assert info.value.reason == "ref_outside_source" and info.value.ref == ref, ref
    assert opener.opened == []                                      # nothing outside was ever opened
    with pytest.raises(RefError) as info:
        resolve_refs(["p:cat/3.png"], sources, (1, 4, 4))
    assert info.value.reason == "ref_not_found"


def test_path_syntax_is_a_slash_digits_are_an_index():
    assert parse_ref("photos:cats/001.png") == ("photos", "cats/001.png")
    assert parse_ref("photos:12") == ("photos", 12)
    assert parse_ref("photos:a/b:c.png") == ("photos", "a/b:c.png")   # the first ':' ends the source
    for ref in ("photos:001.png", "photos:cats", "photos:cats\\1.png"):
        with pytest.raises(RefError) as info:
            parse_ref(ref)
        assert info.value.reason == "malformed_ref", ref


def test_bad_files_are_rejected_per_ref(tmp_path):
    _png(tmp_path / "a" / "small.png", 1, size=(3, 3))
    _png(tmp_path / "a" / "ok.png", 2)
    _png(tmp_path / "b" / "rgb.png", 200, mode="RGB")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    source = ImageFolderSource.open(tmp_path)
    for ref, reason in (("s:a/small.png", "wrong_shape"), ("s:b/broken.png", "bad_image")):
        with pytest.raises(RefError) as info:
            resolve_refs([ref], {"s": source}, (1, 4, 4))
        assert info.value.reason == reason and info.value.ref == ref
    (tmp_path / "a" / "ok.png").unlink()
    with pytest.raises(RefError) as info:
        resolve_refs(["s:a/ok.png"], {"s": source}, (1, 4, 4))
    assert info.value.reason == "ref_not_found"
    x, _ = resolve_refs(["s:b/rgb.png"], {"s": source}, (3, 4, 4))        # RGB for a 3-channel model
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([200, 55, 7]) / 255)
    grey, _ = resolve_refs(["s:b/rgb.png"], {"s": source}, (1, 4, 4))     # grey for a 1-channel one
    assert grey.shape == (1, 1, 4, 4)
    resized = ImageFolderSource.open(tmp_path, resize=True)
    x, _ = resolve_refs(["s:a/small.png"], {"s": resized}, (1, 4, 4))
    assert torch.allclose(x, torch.full((1, 1, 4, 4), 1 / 255))


def test_bad_folders_are_refused_when_opened(tmp_path):
    with pytest.raises(SourceConfigError, match="is not a folder"):
        ImageFolderSource.open(tmp_path / "missing")
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "x.txt").write_text("x")
    with pytest.raises(SourceConfigError, match="holds no images"):
        ImageFolderSource.open(tmp_path)
    source = ImageFolderSource(tmp_path)
    assert "2 channels" in source.accepts((2, 4, 4))


# --- array files ------------------------------------------------------------------------------


def test_an_npz_is_memory_mapped_and_a_ref_reads_one_item(tmp_path):
    n = 20_000
    images = np.zeros((n, 28, 28, 1), dtype=np.uint8)        # NHWC, 15 MiB on disk
    images[12345] = 77
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(n) % 10)
    del images
    tracemalloc.start()
    source = ArraySource.open(tmp_path / "a.npz")
    x, y = resolve_refs(["arr:12345"], {"arr": source})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(source._images, np.memmap) and source.reads == 1
    assert peak < 1 << 20, f"opening and reading one item allocated {peak} bytes"   # the file is 15 MiB
    assert source.image_shape == (1, 28, 28) and y.tolist() == [5]
    assert torch.allclose(x, torch.full((1, 1, 28, 28), 77 / 255))
    with pytest.raises(RefError) as info:
        resolve_refs(["arr:a/1.png"], {"arr": source})
    assert info.value.reason == "malformed_ref"


def test_safetensors_reads_one_slice_and_layouts_are_understood(tmp_path):
    images = torch.rand(40, 3, 5, 6)
    save_file({"images": images, "labels": torch.arange(40) % 4}, tmp_path / "a.safetensors")
    source = ArraySource.open(tmp_path / "a.safetensors")
    x, y = resolve_refs(["s:7", "s:39"], {"s": source})
    assert source.reads == 2 and torch.equal(x, images[[7, 39]]) and y.tolist() == [3, 3]
    np.savez(tmp_path / "hw.npz", images=np.full((3, 5, 6), 255, dtype=np.uint8), labels=np.zeros(3, np.int32))
    assert ArraySource.open(tmp_path / "hw.npz").image_shape == (1, 5, 6)
    np.savez(tmp_path / "f.npz", images=np.full((2, 1, 2, 2), 1.5, np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(RefError) as info:
        resolve_refs(["f:1"], {"f": ArraySource.open(tmp_path / "f.npz")})
    assert info.value.reason == "bad_values" and info.value.ref == "f:1"


def test_bad_array_files_are_refused_when_opened(tmp_path):
    good = {"images": np.zeros((2, 1, 2, 2), np.uint8), "labels": np.zeros(2, np.int64)}
    cases = {
        "missing.npz": None,
        "nolabels.npz": {"images": good["images"]},
        "compressed.npz": "compressed",
        "fewlabels.npz": {"images": good["images"], "labels": np.zeros(1, np.int64)},
        "shape.npz": {"images": np.zeros((2, 2, 2, 2, 2), np.uint8), "labels": good["labels"]},
        "x.csv": "text",
        "nolabels.safetensors": "st",
        "junk.npz": "junk",
    }
    messages = {"missing.npz": "is not a file", "nolabels.npz": "no labels array",
                "compressed.npz": "np.savez, not np.savez_compressed", "fewlabels.npz": "one per image",
                "shape.npz": "must be N×C×H×W", "x.csv": ".npz or .safetensors",
                "nolabels.safetensors": "no labels tensor", "junk.npz": "not a zip"}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, dict):
            np.savez(path, **content)
        elif content == "compressed":
            np.savez_compressed(path, **good)
        elif content == "st":
            save_file({"images": torch.zeros(2, 1, 2, 2)}, path)
        elif content in ("text", "junk"):
            path.write_text("a,b\n")
        with pytest.raises(SourceConfigError, match=messages[name]):
            ArraySource.open(path)
    assert zipfile.is_zipfile(tmp_path / "compressed.npz")


def test_a_model_spec_refuses_a_source_that_cannot_feed_it(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 3, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    source = ArraySource.open(tmp_path / "a.npz")
    with pytest.raises(ValueError, match="its images are 3×8×8, the model takes 1×28×28"):
        ModelSpec("m", (1, 28, 28), 10, {"arr": source})
    spec = ModelSpec("m", (3, 8, 8), 10, {"arr": source, "t": (torch.zeros(1, 3, 8, 8), torch.zeros(1))})
    assert isinstance(spec.sources["t"], TensorSource)
