"""The version manifest (``manifest.json``, schema ``unlearn.manifest/v1``): checking what goes into one,
serialising it, reading it back, and the ``VersionInfo`` a manifest describes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from daemon.registry.layout import (
    MANIFEST_FILE,
    STATE_DICT_FILE,
    RegistryError,
    VerificationError,
    VersionInfo,
    _version_dir,
)

MANIFEST_SCHEMA = "unlearn.manifest/v1"

# Standard manifest keys: extra_manifest may not override them.
_MANIFEST_KEYS = frozenset({
    "schema", "model", "version", "parent", "created_at", "round_id", "request_ids", "method",
    "metrics", "input_shape", "classes", "files", "sha256", "torch_version", "export",
})


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


def _manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _new_manifest(model_name: str, *, shape: tuple[int, int, int], classes: list[str], parent: int | None,
                  round_id: str | None, request_ids: Sequence[str], method: Mapping[str, Any] | None,
                  metrics: Mapping[str, Any] | None, extra_manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    """A new version's manifest, but for ``files``, ``sha256``, ``version`` and ``created_at`` (set as it is
    written); the arguments are ``write_version``'s, checked already but for ``extra_manifest``."""
    extra_meta = _to_json(dict(extra_manifest or {}), "extra_manifest")
    clashes = sorted(set(extra_meta) & _MANIFEST_KEYS)
    if clashes:
        raise ValueError(f"extra_manifest may not set standard manifest keys: {', '.join(clashes)}")
    return {
        **extra_meta,
        "schema": MANIFEST_SCHEMA,
        "model": model_name,
        "parent": parent,
        "round_id": round_id,
        "request_ids": list(request_ids),
        "method": _to_json(dict(method) if method is not None else None, "method"),
        "metrics": _to_json(dict(metrics) if metrics is not None else None, "metrics"),
        "input_shape": list(shape),
        "classes": classes,
        "torch_version": torch.__version__,
    }


def _file_table(files: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` table: the sha256 and size of every file, by name."""
    return {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in sorted(files.items())}


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
