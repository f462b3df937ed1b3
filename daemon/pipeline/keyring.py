"""The daemon's keys from its configuration (``[keys]``): read from the files named, or made on first start.

A configured file must exist (a key named by the operator and missing is a mistake: making one would fork
the key between hosts); the default files (``<state.dir>/keys/state.key`` and ``id.key``) are made, mode 0600,
when missing, so ``make run`` works with embedded defaults. Each key is logged by its id only.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from daemon import keys
from daemon.pipeline.config import Config

__all__ = ["open_keys"]

log = structlog.get_logger("unlearnd.keys")


def _open(path_default: tuple[Path, bool], purpose: str, setting: str) -> keys.SecretKey:
    path, default = path_default
    if default:
        key, made = keys.load_or_create_key(path, purpose)
    else:
        key, made = keys.read_key(path, purpose), False
    log.info("key_ready", purpose=purpose, key_id=key.key_id, path=str(path), made=made, setting=setting)
    if keys.loose_permissions(path):
        log.warning("key_file_readable_by_others", purpose=purpose, path=str(path), setting=setting,
                    fix=f"chmod 600 {path}")
    return key


def open_keys(config: Config) -> keys.DaemonKeys:
    """The state and id keys of ``config``; :class:`daemon.keys.KeyFileError` naming the file and the fix."""
    state_dir = config.state.dir
    return keys.DaemonKeys(
        state=_open(config.keys.state_key_path(state_dir), "state", "keys.state_key_file"),
        ids=_open(config.keys.id_key_path(state_dir), "id", "keys.id_key_file"),
    )
