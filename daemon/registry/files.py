"""Durable file primitives: atomic replacement, fsync of files and directories, chunked sha256."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from daemon.registry.layout import _TMP_PREFIX

_HASH_CHUNK = 1 << 20


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
