"""The on-disk model registry (contract §4): one directory per model, one per version, Triton-compatible.

Layout::

    <registry>/<model>/config.pbtxt                 Triton configuration (platform "pytorch_libtorch")
    <registry>/<model>/<version>/model.pt           TorchScript, CPU, float32 NCHW in [0, 1] -> logits
    <registry>/<model>/<version>/model.safetensors  the state dict
    <registry>/<model>/<version>/manifest.json      provenance and the sha256 of every other file
    <registry>/<model>/LATEST                       the current version number

Why it is shaped this way:

* A receipt says "request R is forgotten in version V with sha256 S". That promise only holds if a
  version directory can never be seen half-written and never changes afterwards, so a version is built
  in a hidden temporary sibling (``.tmp-<uuid>``), every file and the directory are fsynced, and only
  then is it renamed to its number. A crash leaves either the whole version or an invisible temporary
  (``clean_temporaries`` removes it at the next start).
* ``LATEST`` is what the daemon resumes from, so it is replaced atomically and only after the new
  version has been read back and verified against its manifest.
* Triton (poll mode) ignores non-numeric and dot-prefixed entries, so the temporaries never confuse it.
* Weights are read only through safetensors (no pickle); TorchScript exists for serving.

The registry assumes one writer per model (the daemon's model worker); readers may run at any time.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import os
import re
import shutil
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_MAX_BATCH_SIZE",
    "LATEST_FILE",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "STANDARD_FILES",
    "STATE_DICT_FILE",
    "TORCHSCRIPT_FILE",
    "RegistryError",
    "VerificationError",
    "VersionInfo",
    "atomic_write_bytes",
    "clean_temporaries",
    "copy_version",
    "latest_version",
    "list_versions",
    "load_state_dict",
    "load_torchscript",
    "read_extra_file",
    "read_manifest",
    "read_verified",
    "set_latest",
    "verify_version",
    "write_version",
]

MANIFEST_SCHEMA = "unlearn.manifest/v1"
CONFIG_FILE = "config.pbtxt"
LATEST_FILE = "LATEST"
TORCHSCRIPT_FILE = "model.pt"
STATE_DICT_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
STANDARD_FILES = (TORCHSCRIPT_FILE, STATE_DICT_FILE, MANIFEST_FILE)
DEFAULT_MAX_BATCH_SIZE = 256

_TMP_PREFIX = ".tmp-"
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
# Triton ignores version directories that are not numeric or that start with 0, so neither do we use them.
_VERSION_RE = re.compile(r"[1-9][0-9]*")
_MAX_NAME_LEN = 128
_HASH_CHUNK = 1 << 20
_RENAME_ATTEMPTS = 100
# The traced module must reproduce the eager one; CPU TorchScript is normally bit-exact, the tolerance
# only absorbs a fused kernel summing in a different order.
_TRACE_RTOL = 1e-5
_TRACE_ATOL = 1e-6
# Standard manifest keys: extra_manifest may not override them.
_MANIFEST_KEYS = frozenset({
    "schema", "model", "version", "parent", "created_at", "round_id", "request_ids", "method",
    "metrics", "input_shape", "classes", "files", "sha256", "torch_version",
})


class RegistryError(Exception):
    """The registry is missing something or holds something it should not (a caller can't fix it by retrying)."""


class VerificationError(RegistryError):
    """A version's files do not match its manifest: the version must not be served or resumed from.

    Attributes:
        model: the model name.
        version: the version that failed.
        file: the file at fault (``None`` when the version as a whole is at fault).
        reason: what was wrong, in words.
    """

    def __init__(self, model: str, version: int, file: str | None, reason: str) -> None:
        where = f"{file}: " if file else ""
        super().__init__(f"model {model!r} version {version}: {where}{reason}")
        self.model = model
        self.version = version
        self.file = file
        self.reason = reason


@dataclass(frozen=True)
class VersionInfo:
    """One version on disk.

    Attributes:
        model: the model name.
        version: the version number (>= 1).
        path: the version directory.
        manifest: the parsed ``manifest.json``.
        sha256: the sha256 of ``model.safetensors``: the version's identity, quoted in receipts.
    """

    model: str
    version: int
    path: Path
    manifest: dict[str, Any]
    sha256: str


# -- atomic file primitives ---------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    """Make the directory's entries (creations, renames) durable, not only the files' contents."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (the caller fsyncs the directory)."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old content or the new, never a mix.

    The temporary file is a hidden sibling (same filesystem, so the rename is atomic); with ``durable``
    it is fsynced before the rename and the directory after it, so the replacement survives a power cut.
    """
    path = Path(path)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex}"
    try:
        if durable:
            _write_durable(tmp, data)
        else:
            with open(tmp, "xb") as fh:
                fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes, *, durable: bool = True) -> None:
    """Atomically (and, by default, durably) replace the file at ``path`` with ``data`` (its directory must
    exist).

    Readers see either the previous content or ``data``; with ``durable``, a crash leaves at worst a
    hidden ``.tmp-<name>-<uuid>`` sibling, never a truncated ``path``. ``durable=False`` skips the two
    fsyncs (a few ms on a busy disk), for state that means nothing after a crash of its writer.
    """
    _atomic_write_bytes(Path(path), bytes(data), durable)


def _sha256_bytes(data: bytes) -> str:
    """sha256 in chunks, as of a file: hashlib releases the GIL while it hashes each one."""
    digest = hashlib.sha256()
    view = memoryview(data)
    for start in range(0, len(view), _HASH_CHUNK):
        digest.update(view[start:start + _HASH_CHUNK])
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- validation ---------------------------------------------------------------------------------------
def _check_model_name(model_name: str) -> str:
    """Model names become directory names: only a safe single path component is accepted."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model name must be a non-empty string, got {model_name!r}")
    if len(model_name) > _MAX_NAME_LEN:
        raise ValueError(f"model name must be at most {_MAX_NAME_LEN} characters, got {len(model_name)}")
    if model_name.startswith("."):
        raise ValueError(f"model name must not start with '.', got {model_name!r}")
    if not _MODEL_NAME_RE.fullmatch(model_name):
        raise ValueError(
            f"model name may only contain letters, digits, '-', '_' and '.', got {model_name!r}")
    return model_name


def _check_file_name(name: str) -> str:
    """Extra files live next to the standard ones: plain names only, no clashes, nothing hidden."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"extra file name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or os.sep in name:
        raise ValueError(f"extra file name must not contain a path separator, got {name!r}")
    if name in (".", "..") or ".." in name:
        raise ValueError(f"extra file name must not contain '..', got {name!r}")
    if name.startswith("."):
        raise ValueError(f"extra file name must not start with '.', got {name!r}")
    if name in STANDARD_FILES:
        raise ValueError(f"extra file name {name!r} clashes with a standard file ({', '.join(STANDARD_FILES)})")
    if len(name) > _MAX_NAME_LEN or not _FILE_NAME_RE.fullmatch(name):
        raise ValueError(
            f"extra file name may only contain letters, digits, '-', '_' and '.' "
            f"(at most {_MAX_NAME_LEN}), got {name!r}")
    return name


def _check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    return version


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"input_shape must be three positive integers (C, H, W), got {input_shape!r}")
    c, h, w = shape
    return (c, h, w)


def _check_classes(classes: Sequence[str]) -> list[str]:
    names = list(classes)
    if len(names) < 2 or not all(isinstance(c, str) for c in names):
        raise ValueError(f"classes must be at least two strings, got {classes!r}")
    return names


def _to_json(value: Any, what: str) -> Any:
    """Round-trip through strict JSON so that a bad value fails before any file is written."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable without NaN or infinity: {exc}") from exc


# -- paths --------------------------------------------------------------------------------------------
def _model_dir(registry: Path | str, model_name: str) -> Path:
    return Path(registry) / _check_model_name(model_name)


def _version_dir(registry: Path | str, model_name: str, version: int) -> Path:
    return _model_dir(registry, model_name) / str(_check_version(version))


def _numeric_entries(model_dir: Path) -> list[int]:
    """Every numerically named entry, complete or not: the numbers that can no longer be used."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if _VERSION_RE.fullmatch(p.name))


# -- reading ------------------------------------------------------------------------------------------
def latest_version(registry: Path | str, model_name: str) -> int | None:
    """The version ``LATEST`` names, or ``None`` when the model has no ``LATEST`` yet."""
    path = _model_dir(registry, model_name) / LATEST_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from exc
    if not _VERSION_RE.fullmatch(text):
        raise RegistryError(f"{path} does not hold a version number: {text[:40]!r}")
    return int(text)


def list_versions(registry: Path | str, model_name: str) -> list[int]:
    """The model's complete versions, ascending; temporaries and stray entries are invisible.

    A version directory is complete once it exists (it appears by an atomic rename); requiring its
    manifest as well guards against directories someone created by hand.
    """
    model_dir = _model_dir(registry, model_name)
    return [v for v in _numeric_entries(model_dir)
            if (model_dir / str(v)).is_dir() and (model_dir / str(v) / MANIFEST_FILE).is_file()]


def read_manifest(registry: Path | str, model_name: str, version: int) -> dict[str, Any]:
    """The parsed ``manifest.json`` of one version (not verified: see ``verify_version``)."""
    vdir = _version_dir(registry, model_name, version)
    if not vdir.is_dir():
        raise RegistryError(f"model {model_name!r} has no version {version} under {vdir.parent}")
    path = vdir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise VerificationError(model_name, version, MANIFEST_FILE, "missing") from exc
    except (OSError, ValueError) as exc:
        raise VerificationError(model_name, version, MANIFEST_FILE, f"unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise VerificationError(model_name, version, MANIFEST_FILE, "not a manifest (no 'files' table)")
    return manifest


def _info(registry: Path | str, model_name: str, version: int, manifest: dict[str, Any]) -> VersionInfo:
    entry = manifest["files"].get(STATE_DICT_FILE)
    sha = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(sha, str):
        raise VerificationError(model_name, version, STATE_DICT_FILE, "not listed in the manifest")
    return VersionInfo(model=model_name, version=version, path=_version_dir(registry, model_name, version),
                       manifest=manifest, sha256=sha)


def verify_version(registry: Path | str, model_name: str, version: int) -> VersionInfo:
    """Recompute the sha256 of every file the manifest lists; raise ``VerificationError`` on any mismatch.

    Checks: the manifest names this model and version; both standard files are listed; every listed
    file exists, is a regular file, has the recorded size and the recorded sha256.
    """
    return read_verified(registry, model_name, version)[0]


def read_verified(registry: Path | str, model_name: str, version: int,
                  read: Collection[str] = ()) -> tuple[VersionInfo, dict[str, bytes]]:
    """``verify_version``, also returning the contents of the files named in ``read``.

    Each of those is read once and hashed from memory, so the bytes returned are the very bytes whose
    sha256 matched the manifest (a file replaced after the check cannot slip in), with no second read.
    """
    manifest = read_manifest(registry, model_name, version)
    if manifest.get("model") != model_name or manifest.get("version") != version:
        raise VerificationError(
            model_name, version, MANIFEST_FILE,
            f"describes model {manifest.get('model')!r} version {manifest.get('version')!r}")
    files: dict[str, Any] = manifest["files"]
    for required in (TORCHSCRIPT_FILE, STATE_DICT_FILE):
        if required not in files:
            raise VerificationError(model_name, version, required, "not listed in the manifest")
    vdir = _version_dir(registry, model_name, version)
    contents: dict[str, bytes] = {}
    for name, entry in sorted(files.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise VerificationError(model_name, version, name, "manifest entry has no sha256")
        if name not in STANDARD_FILES:
            try:
                _check_file_name(name)
            except ValueError as exc:
                raise VerificationError(model_name, version, name, f"unsafe file name: {exc}") from exc
        path = vdir / name
        if not path.is_file():
            raise VerificationError(model_name, version, name, "missing")
        size = path.stat().st_size
        if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:
            raise VerificationError(model_name, version, name,
                                    f"size {size} bytes, manifest says {entry['bytes']}")
        if name in read:
            try:
                contents[name] = data = path.read_bytes()
            except OSError as exc:
                raise VerificationError(model_name, version, name, f"unreadable: {exc}") from exc
            actual = _sha256_bytes(data)
        else:
            actual = _sha256_file(path)
        if actual != entry["sha256"]:
            raise VerificationError(model_name, version, name,
                                    f"sha256 mismatch: file {actual}, manifest {entry['sha256']}")
    missing = sorted(set(read) - set(contents))
    if missing:
        raise VerificationError(model_name, version, missing[0], "not listed in the manifest")
    return _info(registry, model_name, version, manifest), contents


def _resolve(registry: Path | str, model_name: str, version: int | None) -> int:
    if version is not None:
        return _check_version(version)
    latest = latest_version(registry, model_name)
    if latest is None:
        raise RegistryError(f"model {model_name!r} has no LATEST version under {Path(registry)}")
    return latest


def _get_info(registry: Path | str, model_name: str, version: int | None, verify: bool) -> VersionInfo:
    v = _resolve(registry, model_name, version)
    if verify:
        return verify_version(registry, model_name, v)
    return _info(registry, model_name, v, read_manifest(registry, model_name, v))


def load_state_dict(registry: Path | str, model_name: str, version: int | None = None, *,
                    verify: bool = True) -> tuple[dict[str, torch.Tensor], VersionInfo]:
    """Load a version's weights (CPU tensors) from safetensors; ``version=None`` means ``LATEST``."""
    info = _get_info(registry, model_name, version, verify)
    state = safetensors.torch.load_file(info.path / STATE_DICT_FILE, device="cpu")
    return state, info


def load_torchscript(registry: Path | str, model_name: str, version: int | None = None, *,
                     verify: bool = True) -> tuple[torch.jit.ScriptModule, VersionInfo]:
    """Load a version's serving module on the CPU; ``version=None`` means ``LATEST``."""
    info = _get_info(registry, model_name, version, verify)
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but it is the format Triton's libtorch backend serves.
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        module = torch.jit.load(str(info.path / TORCHSCRIPT_FILE), map_location="cpu")
    return module, info


def read_extra_file(info: VersionInfo, name: str) -> bytes:
    """The bytes of an extra file stored with a version, checked against the manifest's sha256."""
    entry = info.manifest.get("files", {}).get(_check_file_name(name))
    if not isinstance(entry, dict):
        raise RegistryError(f"model {info.model!r} version {info.version} has no extra file {name!r}")
    try:
        data = (info.path / name).read_bytes()
    except FileNotFoundError as exc:
        raise VerificationError(info.model, info.version, name, "missing") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.get("sha256"):
        raise VerificationError(info.model, info.version, name,
                                f"sha256 mismatch: file {actual}, manifest {entry.get('sha256')}")
    return data


# -- writing ------------------------------------------------------------------------------------------
# The export cache: tracing a module (~15 ms of CPU for a small CNN, much more for a deep net) and loading
# its TorchScript back for the check (~8 ms) are most of a publish, and a continual-unlearning daemon
# publishes the same architecture with new weights round after round. So the last few exports are kept,
# keyed by the module's structure (``_structure_key``): the traced module, and the module loaded back from
# its saved archive with that archive's layout signature (``daemon.serving.weights``). An export of a
# module with the same structure copies the new weights into the cached trace instead of tracing again,
# and, when the saved archive has the cached one's layout signature (so loading it is the same as copying
# its storages into the module loaded before: the argument the server's weight-only swaps rest on), copies
# the archive's storages into the cached loaded-back module instead of loading it again. Every check runs
# as before on the result: eager, traced and saved-and-loaded outputs must agree on the probe batch. A cached
# export that fails a check is dropped and the export is redone from scratch, so the cache never makes an
# export fail (or pass) that a fresh one would not.
_EXPORT_CACHE_SIZE = 2
_HOOK_ATTRS = re.compile(r"_.*hooks.*")
_PLAIN_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class _CachedExport:
    traced: torch.jit.ScriptModule
    reloaded: torch.jit.ScriptModule | None = None   # loaded back from an archive with ``signature``
    signature: str | None = None
    tensors: dict[str, torch.Tensor] | None = None   # the trace's parameters and buffers by name


_export_cache: OrderedDict[tuple[Any, ...], _CachedExport] = OrderedDict()
_export_lock = threading.Lock()


def _plain_key(value: Any) -> Any:
    """A hashable stand-in for a plain attribute value; raises ``TypeError`` for anything else."""
    if isinstance(value, _PLAIN_TYPES):
        return (type(value), value)
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value, key=repr) if isinstance(value, (frozenset, set)) else value
        return (type(value), tuple(_plain_key(v) for v in items))
    raise TypeError(type(value).__name__)


def _tensor_key(tensor: torch.Tensor | None) -> Any:
    if tensor is None:
        return None
    return (tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device.type, tensor.requires_grad,
            type(tensor))


def _structure_key(module: nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> tuple[Any, ...] | None:
    """What a trace of ``module`` depends on besides its tensors' values, or ``None`` (never cache it).

    Per submodule: its path, its class (the very class object: same code), every attribute of its instance
    (plain values only: numbers, strings, dtypes and tuples of them, e.g. a convolution's stride and its
    training flag), the names, shapes, strides, dtypes of its parameters and buffers. Anything else on an
    instance (a plain tensor attribute, which a trace bakes in as a constant; a function; a hook; a
    ScriptModule) makes the module uncacheable, as do global module hooks.
    """
    from torch.nn.modules import module as module_mod

    if isinstance(module, torch.jit.ScriptModule):
        return None
    if any(getattr(module_mod, name, None) for name in (
            "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
            "_global_backward_hooks")):
        return None
    parts: list[Any] = [tuple(input_shape), num_classes]
    try:
        for path, sub in module.named_modules(remove_duplicate=False):
            attrs: list[Any] = []
            for name, value in sorted(vars(sub).items()):
                if name in ("_parameters", "_buffers"):
                    attrs.append((name, tuple((k, _tensor_key(v)) for k, v in value.items())))
                elif name == "_modules":
                    attrs.append((name, tuple((k, type(v)) for k, v in value.items())))
                elif _HOOK_ATTRS.fullmatch(name) and isinstance(value, dict):
                    if value:
                        return None
                else:
                    attrs.append((name, _plain_key(value)))
            parts.append((path, type(sub), tuple(attrs)))
    except TypeError:
        return None
    return tuple(parts)


def _copy_weights(source: nn.Module, cached: _CachedExport) -> bool:
    """Copy every parameter and buffer of ``source`` into the same-named one of the cached trace."""
    src = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    if cached.tensors is None:      # walking a ScriptModule's attributes is slow: once per trace
        traced = cached.traced
        cached.tensors = {**dict(traced.named_parameters()), **dict(traced.named_buffers())}
    dst = cached.tensors
    if set(src) != set(dst) or any(src[k].shape != dst[k].shape or src[k].dtype != dst[k].dtype for k in src):
        return False
    with torch.no_grad():
        for key, value in src.items():
            dst[key].copy_(value)
    return True


def _export(module: nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> tuple[bytes, bytes]:
    """Serialise a CPU copy of ``module``: (TorchScript bytes, safetensors bytes).

    The copy is what gets exported, so the caller's module keeps its device, mode and parameters.
    The TorchScript is checked twice against the eager copy, once traced and once after a save/load
    round trip, on a batch of 2 (which also catches a batch size baked in by the trace). The trace and the
    loaded-back module may come from the export cache (see above).
    """
    with _export_lock:
        try:
            ts_bytes = _export_torchscript(module, input_shape, num_classes, use_cache=True)
        except _CachedExportFailed:
            ts_bytes = _export_torchscript(module, input_shape, num_classes, use_cache=False)

    state: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        # clone: safetensors refuses shared storage; contiguous: it stores dense row-major data.
        state[key] = value.detach().to("cpu").contiguous().clone()
    return ts_bytes, safetensors.torch.save(state, metadata={"format": "pt"})


class _CachedExportFailed(Exception):
    """A check failed on a cached trace or loaded-back module: redo the export without the cache."""


def _export_torchscript(module: nn.Module, input_shape: tuple[int, int, int], num_classes: int, *,
                        use_cache: bool) -> bytes:
    from daemon.serving.weights import copy_storages, read_layout

    probe = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        if isinstance(module, torch.jit.ScriptModule):
            # A save/load round trip is the clean way to copy a ScriptModule onto the CPU.
            buffer = io.BytesIO()
            torch.jit.save(module, buffer)
            cpu: nn.Module = torch.jit.load(io.BytesIO(buffer.getvalue()), map_location="cpu").eval()
        else:
            cpu = copy.deepcopy(module).to("cpu").eval()
        expected = cpu(probe)
        if not isinstance(expected, torch.Tensor) or tuple(expected.shape) != (2, num_classes):
            got = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected).__name__
            raise ValueError(f"module must map (N, {', '.join(map(str, input_shape))}) inputs to "
                             f"(N, {num_classes}) logits, got {got}")
        key = _structure_key(cpu, input_shape, num_classes)
        cached = _export_cache.pop(key, None) if key is not None else None
        from_cache = False
        if isinstance(cpu, torch.jit.ScriptModule):
            scripted: torch.jit.ScriptModule = cpu
        elif use_cache and cached is not None and _copy_weights(cpu, cached):
            scripted = cached.traced
            from_cache = True
        else:
            scripted = torch.jit.trace(cpu, torch.zeros((1, *input_shape)), check_trace=False)
            cached = _CachedExport(scripted) if key is not None else None
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        ts_bytes = buffer.getvalue()
        reloaded: torch.jit.ScriptModule | None = None
        layout = read_layout(ts_bytes) if cached is not None else None
        if (use_cache and cached is not None and layout is not None and cached.reloaded is not None
                and cached.signature == layout.signature):
            try:
                copy_storages(cached.reloaded, layout, ts_bytes)
                reloaded = cached.reloaded
                from_cache = True
            except Exception:  # noqa: BLE001 - the archive's entries did not read back: load it in full
                cached.reloaded = cached.signature = None
        if reloaded is None:
            reloaded = torch.jit.load(io.BytesIO(ts_bytes), map_location="cpu")
            if cached is not None and layout is not None:
                cached.reloaded, cached.signature = reloaded, layout.signature
        for label, candidate in (("traced", scripted), ("saved", reloaded)):
            out = candidate(probe)
            if not torch.allclose(out, expected, rtol=_TRACE_RTOL, atol=_TRACE_ATOL):
                if from_cache:
                    raise _CachedExportFailed(label)      # the entry stays out of the cache
                diff = (out - expected).abs().max().item()
                raise ValueError(f"the {label} TorchScript module disagrees with the eager module "
                                 f"(max abs diff {diff:.3g}); the module may need torch.jit.script")
        if key is not None and cached is not None:
            _export_cache[key] = cached
            while len(_export_cache) > _EXPORT_CACHE_SIZE:
                _export_cache.popitem(last=False)
    return ts_bytes


def _triton_config(model_name: str, input_shape: tuple[int, int, int], num_classes: int,
                   max_batch_size: int) -> bytes:
    """Triton's model configuration; the default version policy serves the newest version."""
    dims = ", ".join(str(d) for d in input_shape)
    return (
        f'name: "{model_name}"\n'
        'platform: "pytorch_libtorch"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        '    name: "INPUT__0"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {dims} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        '    name: "OUTPUT__0"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {num_classes} ]\n"
        "  }\n"
        "]\n"
    ).encode("ascii")


def _ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) durably: a new directory entry is fsynced in its parent."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    _fsync_dir(path.parent)


def _write_config(model_dir: Path, content: bytes) -> None:
    path = model_dir / CONFIG_FILE
    try:
        if path.read_bytes() == content:
            return
    except FileNotFoundError:
        pass
    _atomic_write_bytes(path, content)


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def set_latest(registry: Path | str, model_name: str, version: int, *, verify: bool = True) -> VersionInfo:
    """Point ``LATEST`` at ``version`` atomically, after verifying it (also the operator's rollback)."""
    v = _check_version(version)
    info = _get_info(registry, model_name, v, verify)
    _atomic_write_bytes(_model_dir(registry, model_name) / LATEST_FILE, f"{v}\n".encode("ascii"))
    return info


def write_version(
    registry: Path | str,
    model_name: str,
    module: nn.Module,
    *,
    input_shape: tuple[int, ...],
    classes: Sequence[str],
    parent: int | None,
    round_id: str | None = None,
    request_ids: Sequence[str] = (),
    method: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
    set_latest: bool = True,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> VersionInfo:
    """Write ``module`` as the model's next version, crash-safely, and (by default) make it ``LATEST``.

    The number is one more than the highest version ever seen (directories and ``LATEST``), so versions
    only grow. Everything the arguments can get wrong is checked before the first byte is written.

    Arguments:
        registry: the registry root (created if missing).
        model_name: a safe directory name (letters, digits, '-', '_', '.'; not starting with '.').
        module: the classifier; exported from a CPU copy in eval mode, never modified.
        input_shape: (C, H, W) of one input; inputs are float32 in [0, 1].
        classes: the class names, one per logit.
        parent: the version this one was derived from (must exist), or None for a first model.
        round_id, request_ids, method, metrics: provenance recorded in the manifest (strict JSON).
        extra_files: more files for the version directory (plain names), hashed in the manifest.
        extra_manifest: more top-level manifest keys (may not override a standard key).
        set_latest: replace ``LATEST`` once the version is durable and verified.
        max_batch_size: Triton's ``max_batch_size`` in ``config.pbtxt``.

    Raises:
        ValueError: a bad argument (nothing written).
        VerificationError: the written version did not read back as written (``LATEST`` untouched).
    """
    _check_model_name(model_name)
    shape = _check_input_shape(input_shape)
    class_names = _check_classes(classes)
    if parent is not None:
        _check_version(parent)
    if round_id is not None and not isinstance(round_id, str):
        raise ValueError(f"round_id must be a string or None, got {round_id!r}")
    if isinstance(request_ids, str) or not all(isinstance(r, str) for r in request_ids):
        raise ValueError(f"request_ids must be a sequence of strings, got {request_ids!r}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    extras: dict[str, bytes] = {}
    for name, data in (extra_files or {}).items():
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"extra file {name!r} must be bytes, got {type(data).__name__}")
        extras[_check_file_name(name)] = bytes(data)
    extra_meta = _to_json(dict(extra_manifest or {}), "extra_manifest")
    clashes = sorted(set(extra_meta) & _MANIFEST_KEYS)
    if clashes:
        raise ValueError(f"extra_manifest may not set standard manifest keys: {', '.join(clashes)}")
    manifest: dict[str, Any] = {
        **extra_meta,
        "schema": MANIFEST_SCHEMA,
        "model": model_name,
        "parent": parent,
        "round_id": round_id,
        "request_ids": list(request_ids),
        "method": _to_json(dict(method) if method is not None else None, "method"),
        "metrics": _to_json(dict(metrics) if metrics is not None else None, "metrics"),
        "input_shape": list(shape),
        "classes": class_names,
        "torch_version": torch.__version__,
    }

    model_dir = _model_dir(registry, model_name)
    if parent is not None and parent not in list_versions(registry, model_name):
        raise ValueError(f"parent version {parent} of model {model_name!r} does not exist")
    ts_bytes, st_bytes = _export(module, shape, len(class_names))

    _ensure_dir(model_dir)
    _write_config(model_dir, _triton_config(model_name, shape, len(class_names), max_batch_size))

    files = {TORCHSCRIPT_FILE: ts_bytes, STATE_DICT_FILE: st_bytes, **extras}
    manifest["files"] = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                         for name, data in sorted(files.items())}
    manifest["sha256"] = manifest["files"][STATE_DICT_FILE]["sha256"]

    return _commit_version(registry, model_name, model_dir, files, manifest, set_latest)


def copy_version(
    registry: Path | str,
    model_name: str,
    source: int,
    *,
    parent: int | None,
    manifest_updates: Mapping[str, Any] | None = None,
    set_latest: bool = True,
) -> VersionInfo:
    """Write the files of version ``source`` again as the model's next version (an operator's rollback).

    The source is verified first and every byte copied is checked against its manifest again while it is
    read, so a corrupted version is never propagated. The new manifest is the source's with ``parent``,
    ``version``, ``created_at`` and ``manifest_updates`` applied; the file table (and so ``sha256``) is
    unchanged: the new version holds exactly the old weights and extra files (e.g. the session state).
    The write is as crash-safe as ``write_version``'s, and ``LATEST`` moves last (by default).

    Raises:
        ValueError: a bad argument, or ``manifest_updates`` touching a key that identifies the files.
        RegistryError / VerificationError: the source is missing or does not match its manifest.
    """
    _check_model_name(model_name)
    _check_version(source)
    if parent is not None:
        _check_version(parent)
    updates = _to_json(dict(manifest_updates or {}), "manifest_updates")
    fixed = sorted(set(updates) & {"schema", "model", "version", "parent", "created_at", "files", "sha256"})
    if fixed:
        raise ValueError(f"manifest_updates may not set {', '.join(fixed)}")
    if parent is not None and parent not in list_versions(registry, model_name):
        raise ValueError(f"parent version {parent} of model {model_name!r} does not exist")
    src = verify_version(registry, model_name, source)
    files: dict[str, bytes] = {}
    for name, entry in src.manifest["files"].items():
        data = (src.path / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise VerificationError(model_name, source, name, "changed while being copied")
        files[name] = data
    manifest = copy.deepcopy(src.manifest)
    for key in ("version", "created_at"):
        manifest.pop(key, None)
    manifest.update(updates)
    manifest["parent"] = parent

    model_dir = _model_dir(registry, model_name)
    return _commit_version(registry, model_name, model_dir, files, manifest, set_latest)


def _commit_version(registry: Path | str, model_name: str, model_dir: Path, files: Mapping[str, bytes],
                    manifest: dict[str, Any], set_latest: bool) -> VersionInfo:
    """Write the files into a hidden temporary, rename it to the next number, verify, then move LATEST."""
    tmp = model_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write_durable(tmp / name, data)
        version = _rename_into_place(tmp, model_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(model_dir)

    info = verify_version(registry, model_name, version)
    if set_latest:
        _atomic_write_bytes(model_dir / LATEST_FILE, f"{version}\n".encode("ascii"))
    return info


def _next_version(model_dir: Path) -> int:
    used = _numeric_entries(model_dir)
    latest = latest_version(model_dir.parent, model_dir.name)
    return max([0, *used, *([latest] if latest is not None else [])]) + 1


def _rename_into_place(tmp: Path, model_dir: Path, manifest: dict[str, Any]) -> int:
    """Write the manifest for the next free number, fsync, and rename ``tmp`` to that number.

    A rename onto an existing version fails (the target is not empty), so a number taken in between
    (a second writer, or an operator) is skipped rather than overwritten.
    """
    for _ in range(_RENAME_ATTEMPTS):
        version = _next_version(model_dir)
        manifest["version"] = version
        manifest["created_at"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")
        (tmp / MANIFEST_FILE).unlink(missing_ok=True)
        _write_durable(tmp / MANIFEST_FILE, _manifest_bytes(manifest))
        _fsync_dir(tmp)
        try:
            os.rename(tmp, model_dir / str(version))
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                continue
            raise
        return version
    raise RegistryError(f"could not find a free version number under {model_dir} "
                        f"after {_RENAME_ATTEMPTS} attempts")


def clean_temporaries(registry: Path | str, model_name: str) -> list[Path]:
    """Remove the ``.tmp-*`` leftovers of interrupted writes; returns what was removed.

    Call it when no writer is active for the model (at start-up): it cannot tell a crashed write's
    temporary from one in progress.
    """
    model_dir = _model_dir(registry, model_name)
    if not model_dir.is_dir():
        return []
    removed: list[Path] = []
    for entry in sorted(model_dir.iterdir()):
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    if removed:
        _fsync_dir(model_dir)
    return removed
