"""Where the registry keeps things: file names, safe model and file names, version directories, errors.

Everything else in ``daemon.registry`` builds on these; this module touches the filesystem only to list
a model directory's numeric entries.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"                 # Triton label file beside config.pbtxt
LATEST_FILE = "LATEST"
TORCHSCRIPT_FILE = "model.pt"
EXPORT_FILE = "model.pt2"                  # torch.export archive, beside model.pt where the model exports
STATE_DICT_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
STANDARD_FILES = (TORCHSCRIPT_FILE, EXPORT_FILE, STATE_DICT_FILE, MANIFEST_FILE)

_TMP_PREFIX = ".tmp-"
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
# Triton ignores version directories that are not numeric or that start with 0, so neither do we use them.
_VERSION_RE = re.compile(r"[1-9][0-9]*")
_MAX_NAME_LEN = 128


class RegistryError(Exception):
    """The registry is missing something or holds something it should not (a caller can't fix it by retrying)."""


class VerificationError(RegistryError):
    """A version's files do not match its manifest: the version must not be served or resumed from.

    Attributes:
        model: the model name.
        version: the version that failed.
        file: the file at fault (``None`` when the version as a whole is at fault).
        reason: what was wrong, in words.
        code: what kind of fault, a metric label: ``verification`` (files do not match the manifest),
            ``outside`` (a path resolves outside the registry), ``nonfinite`` (weights), ``mismatch`` (a serving
            file does not compute what the weights say), ``load`` (a serving file does not load).
    """

    def __init__(self, model: str, version: int, file: str | None, reason: str, *,
                 code: str = "verification") -> None:
        where = f"{file}: " if file else ""
        super().__init__(f"model {model!r} version {version}: {where}{reason}")
        self.model = model
        self.version = version
        self.file = file
        self.reason = reason
        self.code = code


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


# -- paths --------------------------------------------------------------------------------------------
def _model_dir(registry: Path | str, model_name: str) -> Path:
    return Path(registry) / _check_model_name(model_name)


def _version_dir(registry: Path | str, model_name: str, version: int) -> Path:
    return _model_dir(registry, model_name) / str(_check_version(version))


def _check_inside(registry: Path | str, model_name: str, version: int, names: Iterable[str | None]) -> None:
    """Refuse the version directory (``None``) or a file of it that resolves, through symlinks, outside the
    registry: a version is what the registry holds, not what a link points at."""
    root = Path(os.path.realpath(registry))
    vdir = _version_dir(registry, model_name, version)
    for name in names:
        real = Path(os.path.realpath(vdir if name is None else vdir / name))
        if root not in real.parents:
            raise VerificationError(model_name, version, name, f"resolves outside the registry, to {real}",
                                    code="outside")


def _numeric_entries(model_dir: Path) -> list[int]:
    """Every numerically named entry, complete or not: the numbers that can no longer be used."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if _VERSION_RE.fullmatch(p.name))
