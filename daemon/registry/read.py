"""Reading the registry: ``LATEST``, the complete versions, verification against the manifest, loading."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from daemon.registry.files import _sha256_bytes, _sha256_file
from daemon.registry.layout import (
    LATEST_FILE,
    MANIFEST_FILE,
    STANDARD_FILES,
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    _VERSION_RE,
    RegistryError,
    VerificationError,
    VersionInfo,
    _check_file_name,
    _check_inside,
    _check_version,
    _model_dir,
    _numeric_entries,
    _version_dir,
)
from daemon.registry.manifest import _info, read_manifest


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
    _check_inside(registry, model_name, version, (None, MANIFEST_FILE))
    manifest = read_manifest(registry, model_name, version)
    _check_inside(registry, model_name, version, sorted(manifest["files"]))
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
