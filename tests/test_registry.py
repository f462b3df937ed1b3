"""The model registry (contract §4): layout, integrity, crash safety, and caller isolation.

Tests that take the ``store`` fixture (tests/registry_stores.py) run on both engines: the folder, and the folder
pushed to S3 and read back from the bucket as a server reads it. The rest test the writer's local working copy
(temporaries, a failed or killed write, name checks, the caller's module), which both engines write the same
way; a push interrupted at each step is tests/test_registry_s3.py's."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from daemon import registry as reg
from daemon.registry import (
    LATEST_FILE,
    RegistryError,
    VerificationError,
    clean_temporaries,
    latest_version,
    list_versions,
    load_state_dict,
    load_torchscript,
    read_extra_file,
    read_manifest,
    read_verified,
    set_latest,
    verify_version,
    write_version,
)

from tests.registry_stores import RegistryStore, flip_last_byte

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
CLASSES = ["zero", "one", "two"]
NAME = "tiny-cnn"


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))


def write(root: Path, module: nn.Module, parent: int | None = None, **kwargs: object) -> reg.VersionInfo:
    return write_version(root, NAME, module, input_shape=SHAPE, classes=CLASSES, parent=parent, **kwargs)


def test_two_versions_numbering_latest_and_manifest(store: RegistryStore) -> None:
    """Versions count 1, 2; LATEST follows; the manifest records provenance and each file's sha256."""
    first = write(store.root, tiny_model(0))
    second = write(store.root, tiny_model(1), parent=1, round_id="r-000001", request_ids=["req-a", "req-b"],
                   method={"name": "adv_imp", "params": {"lr": 0.001}}, metrics={"forget_accuracy": 0.0},
                   extra_manifest={"note": "second"})
    assert (first.version, second.version) == (1, 2)
    store.publish(NAME)
    assert store.stored(NAME, None, LATEST_FILE) == b"2\n"
    tmp_path = store.view(NAME)
    assert list_versions(tmp_path, NAME) == [1, 2]
    assert latest_version(tmp_path, NAME) == 2
    assert (tmp_path / NAME / "LATEST").read_text() == "2\n"

    manifest = read_manifest(tmp_path, NAME, 2)
    assert manifest == second.manifest
    assert manifest["version"] == 2 and manifest["parent"] == 1 and manifest["model"] == NAME
    assert manifest["round_id"] == "r-000001" and manifest["request_ids"] == ["req-a", "req-b"]
    assert manifest["method"] == {"name": "adv_imp", "params": {"lr": 0.001}}
    assert manifest["metrics"] == {"forget_accuracy": 0.0}
    assert manifest["input_shape"] == [1, 8, 8] and manifest["classes"] == CLASSES
    assert manifest["note"] == "second" and manifest["created_at"].endswith("Z")
    assert read_manifest(tmp_path, NAME, 1)["parent"] is None
    assert set(manifest["files"]) == {"model.pt", "model.pt2", "model.safetensors"}
    for name, entry in manifest["files"].items():
        data = store.stored(NAME, 2, name)
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert second.sha256 == manifest["files"]["model.safetensors"]["sha256"] == manifest["sha256"]
    assert verify_version(tmp_path, NAME, 2).path == tmp_path / NAME / "2"
    assert first.sha256 != second.sha256
    assert verify_version(tmp_path, NAME, 1).sha256 == first.sha256


def test_triton_config_written_once(tmp_path: Path) -> None:
    """config.pbtxt is a Triton libtorch config with default version policy, rewritten only on change."""
    write(tmp_path, tiny_model())
    path = tmp_path / NAME / "config.pbtxt"
    text = path.read_text()
    for needle in (f'name: "{NAME}"', 'platform: "pytorch_libtorch"', "max_batch_size: 256", '"INPUT__0"',
                   '"OUTPUT__0"', "TYPE_FP32", "dims: [ 1, 8, 8 ]", "dims: [ 3 ]"):
        assert needle in text
    assert "version_policy" not in text
    inode = path.stat().st_ino
    write(tmp_path, tiny_model(), parent=1)
    assert path.stat().st_ino == inode
    write(tmp_path, tiny_model(), parent=2, max_batch_size=64)
    assert "max_batch_size: 64" in path.read_text()


def test_torchscript_alone_matches_eager(store: RegistryStore) -> None:
    """model.pt loaded on its own (no Python class) gives the eager module's logits."""
    module = tiny_model()
    write(store.root, module)
    store.publish(NAME)
    tmp_path = store.view(NAME)
    info = verify_version(tmp_path, NAME, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated upstream
        scripted = torch.jit.load(str(info.path / "model.pt"), map_location="cpu")
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(scripted(x), module.eval()(x), rtol=1e-6, atol=1e-7)
    loaded, loaded_info = load_torchscript(tmp_path, NAME)
    assert loaded_info.version == 1
    with torch.no_grad():
        assert torch.equal(loaded(x), scripted(x))


def test_scripted_module_exported_as_is(store: RegistryStore) -> None:
    """A module the caller already scripted (control flow a trace would freeze) is saved, not re-traced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(tiny_model())
    write(store.root, scripted)
    store.publish(NAME)
    loaded, _ = load_torchscript(store.view(NAME), NAME)
    x = torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(x), scripted(x))


def test_state_dict_round_trip_bit_identical(store: RegistryStore) -> None:
    module = tiny_model()
    write(store.root, module)
    store.publish(NAME)
    state, info = load_state_dict(store.view(NAME), NAME)
    expected = module.state_dict()
    assert info.version == 1 and set(state) == set(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor)
    fresh = tiny_model(seed=99)
    fresh.load_state_dict(state)


def test_shared_storage_and_non_contiguous_tensors_are_saved(store: RegistryStore) -> None:
    """Tied weights and transposed views are stored as plain copies (safetensors refuses shared storage)."""
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 64, bias=False), nn.Linear(64, 3))
    module[1].weight = nn.Parameter(torch.randn(64, 64).t())
    module.register_buffer("tied", module[2].weight)
    write(store.root, module)
    store.publish(NAME)
    state, _ = load_state_dict(store.view(NAME), NAME)
    assert torch.equal(state["1.weight"], module[1].weight.detach())
    assert torch.equal(state["tied"], module[2].weight.detach())


def test_corrupted_file_fails_verification(store: RegistryStore) -> None:
    """One flipped byte in the stored model.safetensors is caught and named by every reader: in a folder at
    load time, in a bucket before the version enters the reader's copy."""
    write(store.root, tiny_model())
    store.publish(NAME)
    store.tamper(NAME, 1, "model.safetensors", flip_last_byte)
    with pytest.raises(VerificationError, match=r"model\.safetensors: sha256") as caught:
        store.verify(NAME, 1)
    assert caught.value.version == 1 and caught.value.file == "model.safetensors"
    assert "sha256" in caught.value.reason
    with pytest.raises(VerificationError, match="model.safetensors"):
        load_state_dict(store.view(NAME), NAME, 1)


def test_a_corrupted_working_copy_loads_only_unverified_and_never_becomes_latest(tmp_path: Path) -> None:
    """The writer's own folder: unverified loads still work on request; LATEST refuses the damaged version."""
    info = write(tmp_path, tiny_model())
    path = info.path / "model.safetensors"
    path.write_bytes(flip_last_byte(path.read_bytes()))
    with pytest.raises(VerificationError, match=r"model\.safetensors: sha256 mismatch"):
        verify_version(tmp_path, NAME, 1)
    _, unverified = load_state_dict(tmp_path, NAME, 1, verify=False)
    assert unverified.sha256 == info.sha256
    with pytest.raises(VerificationError):
        set_latest(tmp_path, NAME, 1)


def test_read_verified_returns_the_bytes_it_hashed_and_checks_every_file(tmp_path: Path) -> None:
    """read_verified reads the named files once, hashes them from memory, and still checks every other file."""
    info = write(tmp_path, tiny_model(), extra_files={"notes.txt": b"hello"})
    got, contents = read_verified(tmp_path, NAME, 1, read=("model.pt",))
    assert got == info and set(contents) == {"model.pt"}
    assert contents["model.pt"] == (info.path / "model.pt").read_bytes()
    assert read_verified(tmp_path, NAME, 1)[1] == {}
    with pytest.raises(VerificationError, match=r"other\.bin: not listed"):
        read_verified(tmp_path, NAME, 1, read=("model.pt", "other.bin"))
    # a corrupted file is refused whether it is read or only hashed
    for name, read in (("model.pt", ("model.pt",)), ("notes.txt", ("model.pt",)), ("model.safetensors", ())):
        path = info.path / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(VerificationError, match=rf"{name.replace('.', chr(92) + '.')}: sha256 mismatch"):
            read_verified(tmp_path, NAME, 1, read=read)
        path.write_bytes(original)
    assert read_verified(tmp_path, NAME, 1, read=("model.pt", "notes.txt"))[1]["notes.txt"] == b"hello"


def test_missing_file_fails_verification(store: RegistryStore) -> None:
    """A stored file gone is named; a version without its manifest is not a version at all."""
    write(store.root, tiny_model())
    store.publish(NAME)
    store.tamper(NAME, 1, "model.pt", lambda _data: None)
    with pytest.raises(VerificationError, match=r"model\.pt: missing"):
        store.verify(NAME, 1)
    with pytest.raises(VerificationError, match=r"model\.pt: missing"):
        load_torchscript(store.view(NAME), NAME)
    store.tamper(NAME, 1, "manifest.json", lambda _data: None)
    with pytest.raises(RegistryError, match=r"manifest"):
        store.verify(NAME, 1)


def test_unknown_version_and_model(store: RegistryStore) -> None:
    empty = store.view(NAME)
    assert latest_version(empty, NAME) is None and list_versions(empty, NAME) == []
    with pytest.raises(RegistryError, match="no LATEST"):
        load_state_dict(empty, NAME)
    write(store.root, tiny_model())
    store.publish(NAME)
    with pytest.raises(RegistryError, match="version 7"):
        store.verify(NAME, 7)
    with pytest.raises(ValueError, match="version must be an integer >= 1"):
        read_manifest(store.view(NAME), NAME, 0)
    store.tamper(NAME, None, LATEST_FILE, lambda _data: b"garbage")
    with pytest.raises(RegistryError, match="does not hold a version number"):
        latest_version(store.view(NAME), NAME)


def test_leftover_temporaries_are_invisible_and_cleaned(tmp_path: Path) -> None:
    """A crashed write's .tmp-* directory (even one named like a version) never shows, nor shifts numbering."""
    write(tmp_path, tiny_model())
    model_dir = tmp_path / NAME
    stale = model_dir / ".tmp-deadbeef"
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"half")
    (stale / "manifest.json").write_text(json.dumps({"version": 2, "files": {}}))
    stale_latest = model_dir / ".tmp-LATEST-cafe"
    stale_latest.write_text("9\n")
    (model_dir / "notes").mkdir()  # non-numeric entries are not versions either
    (model_dir / "05").mkdir()     # nor are zero-padded ones (Triton ignores them too)
    assert list_versions(tmp_path, NAME) == [1]
    assert latest_version(tmp_path, NAME) == 1
    assert write(tmp_path, tiny_model(), parent=1).version == 2
    assert sorted(clean_temporaries(tmp_path, NAME)) == sorted([stale, stale_latest])
    assert not stale.exists() and not stale_latest.exists()
    assert clean_temporaries(tmp_path, NAME) == []
    assert list_versions(tmp_path, NAME) == [1, 2]
    assert clean_temporaries(tmp_path, "never-written") == []


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception half-way through a write removes its temporary and leaves LATEST alone."""
    write(tmp_path, tiny_model())
    real = reg.write._write_durable
    calls = []

    def failing(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(reg.write, "_write_durable", failing)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, tiny_model(), parent=1)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / NAME).iterdir()) == ["1", "LATEST", "config.pbtxt"]
    assert latest_version(tmp_path, NAME) == 1
    assert write(tmp_path, tiny_model(), parent=1).version == 2


def test_set_latest_false_and_rollback(store: RegistryStore) -> None:
    """LATEST can stay put or go back; new versions still take a number above every existing one; readers
    load what LATEST names, not the highest version."""
    write(store.root, tiny_model())
    staged = write(store.root, tiny_model(1), parent=1, set_latest=False)
    store.publish(NAME)
    assert staged.version == 2 and latest_version(store.view(NAME), NAME) == 1
    assert load_state_dict(store.view(NAME), NAME)[1].version == 1
    assert set_latest(store.root, NAME, 2).version == 2
    store.publish(NAME)
    assert latest_version(store.view(NAME), NAME) == 2
    set_latest(store.root, NAME, 1)
    assert write(store.root, tiny_model(2), parent=1).version == 3
    store.publish(NAME)
    _, info = load_state_dict(store.view(NAME), NAME)
    assert info.version == 3


def test_extra_files_stored_and_hashed(store: RegistryStore) -> None:
    extras = {"session.safetensors": b"\x00\x01tensor-bytes", "session.json": b'{"rounds": 3}'}
    write(store.root, tiny_model(), extra_files=extras)
    store.publish(NAME)
    info = verify_version(store.view(NAME), NAME, 1)
    assert set(info.manifest["files"]) == {"model.pt", "model.pt2", "model.safetensors", *extras}
    for name, data in extras.items():
        assert read_extra_file(info, name) == data
        assert info.manifest["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
    with pytest.raises(RegistryError, match="no extra file 'other.bin'"):
        read_extra_file(info, "other.bin")
    (info.path / "session.json").write_bytes(b'{"rounds": 4}')         # in the reader's own copy
    with pytest.raises(VerificationError, match=r"session\.json: sha256 mismatch"):
        read_extra_file(info, "session.json")
    store.tamper(NAME, 1, "session.json", lambda _data: b'{"rounds": 5}')   # in the store
    with pytest.raises(VerificationError, match=r"session\.json"):
        store.verify(NAME, 1)


@pytest.mark.parametrize("name, message", [
    ("", "non-empty"),
    (".hidden", r"must not start with '\.'"),
    ("..", r"must not start with '\.'"),
    ("a/b", "may only contain"),
    ("a b", "may only contain"),
    ("x" * 129, "at most 128"),
])
def test_bad_model_names_rejected(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_version(tmp_path, name, tiny_model(), input_shape=SHAPE, classes=CLASSES, parent=None)
    with pytest.raises(ValueError, match=message):
        list_versions(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, message", [
    ("../evil", "path separator"),
    ("dir/file", "path separator"),
    ("a\\b", "path separator"),
    ("..", r"must not contain '\.\.'"),
    ("x..y", r"must not contain '\.\.'"),
    (".hidden", r"must not start with '\.'"),
    ("model.pt", "clashes with a standard file"),
    ("manifest.json", "clashes with a standard file"),
    ("", "non-empty"),
    ("sp ace", "may only contain"),
])
def test_bad_extra_file_names_rejected(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write(tmp_path, tiny_model(), extra_files={name: b"x"})
    assert list_versions(tmp_path, NAME) == []


def test_bad_arguments_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input_shape must be three positive integers"):
        write_version(tmp_path, NAME, tiny_model(), input_shape=(8, 8), classes=CLASSES, parent=None)
    with pytest.raises(ValueError, match=r"to \(N, 4\) logits, got \(2, 3\)"):
        write_version(tmp_path, NAME, tiny_model(), input_shape=SHAPE, classes=[*CLASSES, "three"], parent=None)
    with pytest.raises(ValueError, match="metrics must be JSON-serialisable"):
        write(tmp_path, tiny_model(), metrics={"loss": float("nan")})
    with pytest.raises(ValueError, match="standard manifest keys: version"):
        write(tmp_path, tiny_model(), extra_manifest={"version": 9})
    with pytest.raises(ValueError, match="parent version 4 .* does not exist"):
        write(tmp_path, tiny_model(), parent=4)
    with pytest.raises(ValueError, match="request_ids must be a sequence of strings"):
        write(tmp_path, tiny_model(), request_ids="req-1")
    assert not (tmp_path / NAME).exists()


def test_callers_module_untouched(tmp_path: Path) -> None:
    """Exporting neither moves, re-modes, freezes nor changes the caller's module."""
    module = tiny_model()
    module.train()
    module[3].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    params = {n: (p, p.data_ptr(), p.requires_grad, p.device) for n, p in module.named_parameters()}
    write(tmp_path, module)
    assert module.training and all(m.training for m in module.modules())
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])
    for n, p in module.named_parameters():
        assert (p, p.data_ptr(), p.requires_grad, p.device) == params[n]
        assert p.grad is None


_CRASH_CHILD = """
import sys, torch
from torch import nn
from daemon.registry import latest_version, write_version
torch.set_num_threads(1)
torch.manual_seed(0)
root = sys.argv[1]
# About 2 MB of weights: a write takes several milliseconds, so kills land inside writes.
m = nn.Sequential(nn.Flatten(), nn.Linear(64, 8192), nn.ReLU(), nn.Linear(8192, 3))
print("ready", flush=True)
while True:
    write_version(root, "crashy", m, input_shape=(1, 8, 8), classes=["a", "b", "c"],
                  parent=latest_version(root, "crashy"), extra_files={"session.json": b"{}"})
    with torch.no_grad():
        m[1].weight.add_(0.01)
"""


def test_sigkill_during_writes_leaves_only_complete_versions(tmp_path: Path) -> None:
    """Killed at random moments mid-loop, the writer leaves only verifiable versions and a verified LATEST."""
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    stderr_path = tmp_path / "child.stderr"
    for attempt in range(3):
        with open(stderr_path, "w") as stderr:
            child = subprocess.Popen([sys.executable, "-c", _CRASH_CHILD, str(tmp_path)], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                child.wait(timeout=30)
                pytest.fail(f"crash child did not start: {stderr_path.read_text()}")
            if attempt == 0:  # make sure at least one version exists before the first kill
                deadline = time.monotonic() + 20
                while latest_version(tmp_path, "crashy") is None and time.monotonic() < deadline:
                    time.sleep(0.01)
            time.sleep(rng.uniform(0.02, 0.6))
            if child.poll() is not None:
                pytest.fail(f"crash child died before the kill: {stderr_path.read_text()}")
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()

    versions = list_versions(tmp_path, "crashy")
    assert versions, "the writer never completed a version"
    assert versions == list(range(1, len(versions) + 1))
    for v in versions:
        verify_version(tmp_path, "crashy", v)
    latest = latest_version(tmp_path, "crashy")
    assert latest in versions
    verify_version(tmp_path, "crashy", latest)
    clean_temporaries(tmp_path, "crashy")
    assert not [p for p in (tmp_path / "crashy").iterdir() if p.name.startswith(".")]
    assert (tmp_path / "crashy" / "config.pbtxt").is_file()
    nxt = write_version(tmp_path, "crashy", nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), input_shape=(1, 8, 8),
                        classes=["a", "b", "c"], parent=latest)
    assert nxt.version == versions[-1] + 1


def test_atomic_write_without_fsync_still_replaces_whole(tmp_path: Path) -> None:
    """durable=False (leases) skips the fsyncs, not the atomic replace: no temporary is left behind."""
    target = tmp_path / "lease.json"
    reg.atomic_write_bytes(target, b"first")
    reg.atomic_write_bytes(target, b"second", durable=False)
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["lease.json"]


# -- the export cache: a republished architecture is not traced or loaded back again -----------------------
def alone(info: reg.VersionInfo, x: torch.Tensor) -> torch.Tensor:
    """What the version's model.pt computes loaded on its own, in a fresh module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(info.path / "model.pt"), map_location="cpu").eval()
    with torch.no_grad():
        return module(x)


def archive_names(info: reg.VersionInfo) -> list[str]:
    import zipfile

    with zipfile.ZipFile(info.path / "model.pt") as zf:
        return sorted(zf.namelist())


X = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(11))


def test_republished_architecture_reuses_the_trace_and_serves_exactly_the_new_weights(tmp_path: Path) -> None:
    """Each round's module (the same object, or a copy of it as the daemon passes) is exported through the
    cached trace (same TorchScript class names, no fresh trace) and its model.pt computes its own weights."""
    import copy

    module = tiny_model(0).eval()
    infos = [write(tmp_path, module)]
    entry = list(reg.export._export_cache.values())[-1]          # the entry the export just used
    reloaded = entry.reloaded
    for step in range(3):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        infos.append(write(tmp_path, copy.deepcopy(module) if step % 2 else module, parent=infos[-1].version))
        with torch.no_grad():
            assert torch.allclose(alone(infos[-1], X), module(X), rtol=1e-6, atol=1e-7)
        state, _ = load_state_dict(tmp_path, NAME, infos[-1].version)
        assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    assert all(archive_names(i) == archive_names(infos[0]) for i in infos)   # one trace for all four
    assert entry.reloaded is reloaded                                         # loaded back once, then copied into
    outs = [alone(i, X) for i in infos]
    assert all(not torch.equal(a, b) for a, b in zip(outs, outs[1:]))


class Gained(nn.Module):
    """A plain attribute that the trace bakes in (a change must trace again), and a branch on a weight."""

    def __init__(self, gain: float = 2.0) -> None:
        super().__init__()
        self.gain = gain
        self.lin = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(torch.flatten(x, 1)) * self.gain
        if bool(self.lin.bias.sum() > 0):        # data-dependent control flow: a trace freezes one branch
            y = y + 1.0
        return y


def test_changed_attribute_or_weight_dependent_branch_is_traced_again(tmp_path: Path) -> None:
    """A cached trace is reused only for the same structure, and one that no longer matches the eager module
    (a branch on a weight's value) is dropped and traced afresh: model.pt always computes what the module does."""
    torch.manual_seed(0)
    module = Gained().eval()
    with torch.no_grad():
        module.lin.bias.fill_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        first = write(tmp_path, module)
        module.gain = 3.0                         # a structure change: new key, new trace
        second = write(tmp_path, module, parent=first.version)
        with torch.no_grad():
            module.lin.bias.fill_(-1.0)           # the cached trace took the other branch: redone
        third = write(tmp_path, module, parent=second.version)
    with torch.no_grad():
        assert torch.allclose(alone(third, X), module(X), rtol=1e-6, atol=1e-7)
        module.lin.bias.fill_(1.0)
        assert torch.allclose(alone(second, X), module(X), rtol=1e-6, atol=1e-7)
        module.gain = 2.0
        assert torch.allclose(alone(first, X), module(X), rtol=1e-6, atol=1e-7)
    assert archive_names(first) != archive_names(second) != archive_names(third)
