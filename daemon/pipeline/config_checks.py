"""Checks of a configuration's values that the per-field ranges cannot express, and of the folders it names.

:func:`check_values` runs inside :func:`daemon.pipeline.config.load_config` (pure: no I/O), so every command
refuses a value the daemon would die on later with a traceback: a port outside 1-65535, a bootstrap entry that
is not ``host:port``, a partition count that would make a broker allocate without bound.

:func:`check_folders` looks at the disk and is run by ``unlearnd config check`` and by the daemon's start
(not by every command: ``unlearnd audit verify`` may run where the state is read-only). It refuses a state
folder the daemon cannot write (``/proc/self``, a file, a read-only mount) and returns warnings for a state or
registry folder that every local user may write (anyone could then replace the ledger or a model version).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from pathlib import Path

from daemon.pipeline.config import Config, ConfigError

__all__ = ["MAX_PARTITIONS", "check_folders", "check_registry_store", "check_registry_url", "check_state_database",
           "check_state_url", "check_values", "parse_bootstrap"]

#: The requests topic's partitions at most: each is a consumer's unit of work (one per daemon is enough to spread
#: the models); the embedded broker allocates per partition, so an unbounded count grows it without bound.
MAX_PARTITIONS = 1024
_PORT_SETTINGS = (("metrics", "port"),)
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>[0-9]{1,5})$")


def parse_bootstrap(value: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]`` (an IPv6 host in brackets) as pairs; ValueError saying which entry is wrong."""
    out = []
    for entry in (e.strip() for e in value.split(",")):
        m = _HOST_PORT.match(entry)
        if m is None:
            raise ValueError(f"{entry!r} is not host:port (e.g. 127.0.0.1:19092, broker.example:9092, [::1]:9092)")
        port = int(m["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"{entry!r}: port {port} is outside 1-65535")
        out.append((m["v6"] or m["host"], port))
    return out


def check_values(config: Config) -> None:
    """Cross-field and syntax rules of single values; raises :class:`ConfigError` naming the setting."""
    from daemon.pipeline.metrics_http import check_endpoint_settings

    problem = check_endpoint_settings(config)     # TLS and token files of /metrics and the notify calls
    if problem is not None:
        raise ConfigError(*problem)
    for section, key in _PORT_SETTINGS:
        port = getattr(getattr(config, section), key)
        if not 0 <= port <= 65535:
            raise ConfigError(f"{section}.{key}", f"must be a TCP port, 1-65535 (0 disables it), got {port}")
    try:
        parse_bootstrap(config.kafka.bootstrap)
    except ValueError as exc:
        raise ConfigError("kafka.bootstrap", str(exc)) from None
    check_state_url(config.state.url)
    check_registry_url(config)
    if config.kafka.partitions > MAX_PARTITIONS:
        raise ConfigError("kafka.partitions", f"must be at most {MAX_PARTITIONS} (one per daemon sharing the "
                                              f"models is enough), got {config.kafka.partitions}")


def check_state_url(url: str) -> None:
    """``state.url``'s syntax (no I/O): empty, or ``postgresql://[user@]host[:port]/database`` without a password."""
    if not url:
        return
    from urllib.parse import urlsplit

    from daemon.pipeline.ledger_sql import POSTGRES_SCHEMES, redact_url

    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ConfigError("state.url", f"{shown!r}: must be postgresql://user@host:port/database (or empty for "
                                       f"SQLite in state.dir)")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("state.url", f"{shown!r}: the port is not a number in 1-65535") from None
    if not parts.hostname and "host=" not in parts.query:
        raise ConfigError("state.url", f"{shown!r}: names no host")
    if port == 0 or not parts.path.strip("/"):
        raise ConfigError("state.url", f"{shown!r}: needs a port in 1-65535 (or none) and a database name")
    if parts.password is not None:
        raise ConfigError("state.url", f"{shown!r}: holds a password, which config show and the logs would reveal: "
                                       f"give it in PGPASSWORD or a ~/.pgpass file (libpq reads them)")


def check_state_database(config: Config, *, wait_s: float = 0.0) -> None:
    """The ledger's PostgreSQL database (``state.url``) answers: run by ``config check`` and the daemon's start, so
    an unreachable server or a refused login is a usage error naming the setting, before anything is set up.

    ``wait_s`` (the daemon's start: ``state.wait_s``) rides out a server that does not answer yet - a restart, a
    failover, a database container started beside the daemon - retrying each second; a refused login or a missing
    database is final at once."""
    if not config.state.url:
        return
    import structlog

    from daemon.pipeline.ledger_sql import Engine, EngineError, LedgerUnavailable

    deadline = time.monotonic() + wait_s
    while True:
        try:
            Engine.open(config.state.url).close()
            return
        except LedgerUnavailable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" (waited {wait_s:g} s, state.wait_s)" if wait_s else ""
                raise ConfigError("state.url", str(exc).removeprefix("state.url: ") + waited) from None
            structlog.get_logger("unlearnd.daemon").warning("ledger_waiting", error=str(exc), left_s=round(left, 1))
            time.sleep(min(1.0, left))
        except EngineError as exc:
            raise ConfigError("state.url", str(exc).removeprefix("state.url: ")) from None


def check_registry_url(config: Config) -> None:
    """``registry.url`` and ``registry.endpoint_url``'s syntax (no I/O)."""
    from daemon.registry.mirror import check_endpoint_url, resolve_registry
    from daemon.registry.remote import RemoteConfigError

    r = config.registry
    try:
        resolve_registry(r.url, r.dir)
        check_endpoint_url(r.endpoint_url)
    except RemoteConfigError as exc:
        raise _named(exc) from None


def check_registry_store(config: Config) -> None:
    """An ``s3://`` registry answers (one HEAD of the bucket): run by ``config check``, the daemon's start and the
    CLI, so an unreachable endpoint, a missing bucket or refused credentials is a usage error naming the setting."""
    from daemon.registry.mirror import open_mirror
    from daemon.registry.remote import RemoteConfigError

    r = config.registry
    try:
        open_mirror(r.url, r.dir, endpoint_url=r.endpoint_url, region=r.region)
    except RemoteConfigError as exc:
        raise _named(exc) from None


def _named(exc: Exception) -> ConfigError:
    """A registry error ("registry.url: why") as the ConfigError of the setting it names."""
    setting, _, detail = str(exc).partition(" ")
    return ConfigError(setting.rstrip(":"), detail.lstrip(": "))


def check_folders(config: Config) -> list[str]:
    """Refuse a state folder the daemon cannot create or write; return warnings for world-writable folders."""
    state = Path(config.state.dir)
    _check_writable_dir("state.dir", state)
    warnings = []
    from daemon.registry.mirror import resolve_registry

    registry_dir = resolve_registry(config.registry.url, config.registry.dir)[0]
    for setting, path in (("state.dir", state), ("registry.dir", registry_dir)):
        try:
            mode = path.stat().st_mode
        except OSError:
            continue                            # created later by the daemon, with its umask
        if stat.S_ISDIR(mode) and mode & stat.S_IWOTH:
            warnings.append(f"{setting}: {path} is world-writable (mode {stat.filemode(mode)}): any local user "
                            f"could replace {'the ledger' if setting == 'state.dir' else 'a model version'}; "
                            f"chmod o-w {path}")
    return warnings


def _check_writable_dir(setting: str, path: Path) -> None:
    """``path`` is a writable directory, or can be made one (its nearest existing ancestor is)."""
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(setting, f"{path}: {probe} is a dangling symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(setting, f"{path} is not a directory ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(setting, f"{path} is not writable by this user ({probe} refuses writes)")
    try:                                        # access() trusts mode bits: root, /proc and read-only mounts lie
        os.rmdir(tempfile.mkdtemp(prefix=".unlearnd-check-", dir=probe))
    except OSError as exc:
        raise ConfigError(setting, f"{path} is not a writable directory ({probe}: {exc.strerror or exc})") from None
