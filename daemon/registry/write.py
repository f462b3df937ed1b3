"""Writing the registry: a new version built in a hidden temporary and renamed into place, ``LATEST``
moved last, and the leftovers of interrupted writes cleaned up.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog
from torch import nn

from daemon.registry.export import DEFAULT_MAX_BATCH_SIZE, _export, _export_pt2, _labels, _triton_config, _write_config
from daemon.registry.files import _atomic_write_bytes, _ensure_dir, _fsync_dir, _write_durable
from daemon.registry.layout import (
    EXPORT_FILE,
    LABELS_FILE,
    LATEST_FILE,
    MANIFEST_FILE,
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    _TMP_PREFIX,
    RegistryError,
    VerificationError,
    VersionInfo,
    _check_file_name,
    _check_model_name,
    _check_version,
    _model_dir,
    _numeric_entries,
)
from daemon.registry.manifest import (
    _check_classes,
    _check_input_shape,
    _file_table,
    _manifest_bytes,
    _new_manifest,
    _to_json,
)
from daemon.registry.read import _get_info, latest_version, list_versions, verify_version

_RENAME_ATTEMPTS = 100
_log = structlog.get_logger("unlearnd.registry")

#: files written once the version number is known (issue 23: sealed per version): called with the number, it
#: returns the files to add and the manifest keys to set
Sealer = Callable[[int], tuple[Mapping[str, bytes], Mapping[str, Any]]]


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
    label_file: bool = False,
    export_pt2: bool = True,
    sealed_files: Sealer | None = None,
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
        label_file: also write the class names as Triton's ``labels.txt`` beside ``config.pbtxt`` and
            name it on the output (``label_filename``), for Triton's classification extension.
        export_pt2: also write a ``torch.export`` archive (``model.pt2``) when the model exports; the manifest's
            ``export`` says whether it did (and why not).
        sealed_files: files that depend on the version number (encrypted with it as authenticated data),
            made once the number is chosen (again if a concurrent writer took it); hashed in the manifest.

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
    manifest = _new_manifest(model_name, shape=shape, classes=class_names, parent=parent, round_id=round_id,
                             request_ids=request_ids, method=method, metrics=metrics,
                             extra_manifest=extra_manifest)

    model_dir = _model_dir(registry, model_name)
    if parent is not None and parent not in list_versions(registry, model_name):
        raise ValueError(f"parent version {parent} of model {model_name!r} does not exist")
    ts_bytes, st_bytes = _export(module, shape, len(class_names))
    pt2_bytes, pt2_error = _export_pt2(module, shape) if export_pt2 else (None, "not requested")
    if pt2_bytes is None and export_pt2:
        _log.warning("pt2_export_failed", model=model_name, detail=pt2_error)
    manifest["export"] = {"pt2": pt2_bytes is not None, **({"error": pt2_error} if pt2_bytes is None else {})}

    labels = _labels(class_names) if label_file else None
    _ensure_dir(model_dir)
    if labels is not None:
        _write_config(model_dir, labels, LABELS_FILE)     # before the config that names it
    _write_config(model_dir, _triton_config(model_name, shape, len(class_names), max_batch_size,
                                            label_file=label_file))

    files = {TORCHSCRIPT_FILE: ts_bytes, STATE_DICT_FILE: st_bytes, **extras}
    if pt2_bytes is not None:
        files[EXPORT_FILE] = pt2_bytes
    manifest["files"] = _file_table(files)
    manifest["sha256"] = manifest["files"][STATE_DICT_FILE]["sha256"]

    return _commit_version(registry, model_name, model_dir, files, manifest, set_latest, sealed_files)


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
                    manifest: dict[str, Any], set_latest: bool, sealed_files: Sealer | None = None) -> VersionInfo:
    """Write the files into a hidden temporary, rename it to the next number, verify, then move LATEST."""
    tmp = model_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        for name, data in files.items():
            _write_durable(tmp / name, data)
        version = _rename_into_place(tmp, model_dir, manifest, sealed_files)
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


def _rename_into_place(tmp: Path, model_dir: Path, manifest: dict[str, Any], sealed_files: Sealer | None = None
                       ) -> int:
    """Write the manifest for the next free number, fsync, and rename ``tmp`` to that number.

    A rename onto an existing version fails (the target is not empty), so a number taken in between
    (a second writer, or an operator) is skipped rather than overwritten.
    """
    for _ in range(_RENAME_ATTEMPTS):
        version = _next_version(model_dir)
        manifest["version"] = version
        if sealed_files is not None:
            sealed, keys = sealed_files(version)
            for name, data in sealed.items():
                (tmp / _check_file_name(name)).unlink(missing_ok=True)
                _write_durable(tmp / name, bytes(data))
            manifest["files"] = {**manifest["files"], **_file_table(sealed)}
            manifest.update(keys)
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
