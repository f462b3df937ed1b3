"""The ledger's two engines behind one connection: SQLite (embedded, the default) and PostgreSQL (psycopg 3).

The ledger writes its SQL once, in SQLite's spelling with ``?`` placeholders and the upserts both engines share
(``INSERT ... ON CONFLICT (...) DO UPDATE``/``DO NOTHING``). :class:`Engine` is the dialect layer between: it
translates a statement once (``?`` -> ``%s``, ``instr`` -> ``strpos``) and caches it, derives PostgreSQL's schema
from the one schema document (:mod:`daemon.pipeline.ledger_schema`: ``INTEGER`` -> ``BIGINT``, ``REAL`` ->
``DOUBLE PRECISION``, ``BLOB`` -> ``BYTEA``, ``AUTOINCREMENT`` -> ``BIGSERIAL``, a PL/pgSQL trigger for the
append-only audit trail), and owns the write transaction.

**Write transactions are serialised, on both engines.** SQLite's ``BEGIN IMMEDIATE`` takes the file's write
lock; PostgreSQL's takes a transaction-scoped advisory lock (:data:`WRITE_LOCK`) as its first statement, at READ
COMMITTED, so every later statement of the transaction sees every commit made before the lock was granted. That
is what the ledger's invariants need from two daemons (or ``unlearnd rebase``) sharing one database: one audit
chain with one tail (read the last entry, append after it), round and rebase ids counted without a gap or a
double, a delivery decided once. A global lock, not SERIALIZABLE: the audit chain is a global order anyway, and a
transaction that cannot fail on a conflict need not be replayable (an intake poll's block is not). Reads run
outside it (autocommit), each statement on a consistent snapshot.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["POSTGRES_SCHEMES", "WRITE_LOCK", "Engine", "EngineError", "LedgerUnavailable", "postgres_schema",
           "redact_url"]

POSTGRES_SCHEMES = ("postgresql", "postgres")
#: The advisory lock key every ledger write transaction holds in PostgreSQL (advisory locks are per database).
WRITE_LOCK = 0x756E6C65   # "unle"
_CONNECT_TIMEOUT_S = 10


class EngineError(RuntimeError):
    """The database cannot be opened or reached; the message names the setting (``state.url``/``state.dir``)."""


class LedgerUnavailable(EngineError):
    """The PostgreSQL server went away (a restart, a failover, the network): nothing of the statement or
    transaction that raised it took effect, and the next call connects again. The daemon waits it out between
    rounds (intake is read again from the same offsets) and stops if it strikes inside a round's commit, so that
    start-up recovery resolves the round."""


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _postgres_statement(sql: str) -> str:
    """SQLite's spelling -> PostgreSQL's: placeholders and the one string function the ledger uses."""
    return sql.replace("%", "%%").replace("?", "%s").replace("instr(", "strpos(")


def postgres_schema(sqlite_schema: str) -> str:
    """PostgreSQL's DDL, derived from the SQLite schema document so the two cannot drift apart."""
    tables = sqlite_schema.split("CREATE TRIGGER", 1)[0]
    ddl = tables.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
    ddl = re.sub(r"\bINTEGER\b", "BIGINT", ddl)
    ddl = re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl)
    ddl = re.sub(r"\bBLOB\b", "BYTEA", ddl)
    # SQLite orders deliveries by rowid (INSERT OR REPLACE gives a replaced row a new one); PostgreSQL by seq
    ddl = ddl.replace('PRIMARY KEY (topic, partition, "offset")',
                      'seq BIGSERIAL NOT NULL,\n    PRIMARY KEY (topic, partition, "offset")')
    return ddl + """
CREATE OR REPLACE FUNCTION unlearnd_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'the audit trail is append-only (% refused)', TG_OP; END $$;
CREATE OR REPLACE TRIGGER audit_no_update BEFORE UPDATE ON audit
    FOR EACH ROW EXECUTE FUNCTION unlearnd_audit_append_only();
CREATE OR REPLACE TRIGGER audit_no_delete BEFORE DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION unlearnd_audit_append_only();
CREATE OR REPLACE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION unlearnd_audit_append_only();
"""


_SQLITE_DELIVERY = "INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?, ?)"
_POSTGRES_DELIVERY = ('INSERT INTO deliveries (topic, partition, "offset", fingerprint, request_id, effect) '
                      'VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (topic, partition, "offset") DO UPDATE SET '
                      "fingerprint=excluded.fingerprint, request_id=excluded.request_id, effect=excluded.effect, "
                      "seq=nextval(pg_get_serial_sequence('deliveries', 'seq'))")


def _reason(exc: BaseException) -> str:
    """libpq's message on one line (it spreads the cause and a hint over several, the hint tab-indented)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _connect_postgres(url: str, error: type[EngineError] = EngineError) -> Any:
    import psycopg

    try:
        db = psycopg.connect(url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S, application_name="unlearnd")
        # explicit, whatever default_transaction_isolation the server has: at REPEATABLE READ or SERIALIZABLE
        # the snapshot would be taken by the lock statement, before the previous writer committed
        db.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    except psycopg.Error as exc:
        # no SQLSTATE: the server never answered (down, restarting, unreachable) - worth waiting for; a refused
        # login or a missing database has one, and waiting would not change it
        kind = LedgerUnavailable if getattr(exc, "sqlstate", None) is None else error
        raise kind(f"state.url: cannot open the PostgreSQL ledger at {redact_url(url)}: {_reason(exc)}") from None
    return db


class Engine:
    """One connection to the ledger's database, SQLite or PostgreSQL, speaking SQLite's spelling of SQL.

    Thread-safe the way the ledger uses it: every call holds one lock (the ledger's threads share a connection).
    """

    def __init__(self, kind: str, db: Any, where: str) -> None:
        self.kind, self.where, self._db = kind, where, db
        self.lock = threading.RLock()
        self._url: str | None = None            # PostgreSQL: to connect again after the server went away
        self._in_write = False
        self._sql: dict[str, str] = {}
        #: the statement that records a delivery (replacing the row of a reused offset), and its recording order
        self.delivery_upsert = _SQLITE_DELIVERY if kind == "sqlite" else _POSTGRES_DELIVERY
        self.delivery_order = "rowid" if kind == "sqlite" else "seq"
        if kind == "sqlite":
            self.errors: tuple[type[BaseException], ...] = (sqlite3.DatabaseError,)
        else:
            import psycopg
            self.errors = (psycopg.Error,)

    # -- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, target: Path | str, *, synchronous: str = "NORMAL") -> Engine:
        """``postgresql://...`` (or ``postgres://``): PostgreSQL; anything else: the path of a SQLite file."""
        text = str(target)
        if urlsplit(text).scheme in POSTGRES_SCHEMES:
            return cls._open_postgres(text)
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise EngineError(f"{path}: not a usable ledger: {exc}") from exc
        return cls("sqlite", db, str(path))

    @classmethod
    def _open_postgres(cls, url: str) -> Engine:
        try:
            import psycopg
        except ImportError as exc:                      # pragma: no cover - a dependency of the package
            raise EngineError(f"state.url: PostgreSQL needs psycopg 3 (pip install 'psycopg[binary]'): {exc}") from exc
        engine = cls("postgresql", _connect_postgres(url), redact_url(url))
        engine._url = url
        return engine

    def close(self) -> None:
        with self.lock:
            self._db.close()

    # -- statements ----------------------------------------------------------------------------------------
    def _translate(self, sql: str) -> str:
        if self.kind == "sqlite":
            return sql
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = _postgres_statement(sql)
        return out

    # -- a server that went away -----------------------------------------------------------------------
    def _lost(self, exc: BaseException) -> bool:
        """True when ``exc`` came from a PostgreSQL connection that is gone (not from the statement itself)."""
        return self.kind == "postgresql" and (self._db.broken or self._db.closed) and not isinstance(exc, EngineError)

    def _reconnect(self) -> None:
        """A fresh connection in place of a broken one; :class:`LedgerUnavailable` while the server is down."""
        import structlog

        try:
            self._db.close()
        except Exception:  # noqa: BLE001 - it is broken already
            pass
        self._db = _connect_postgres(self._url or "", LedgerUnavailable)
        structlog.get_logger("unlearnd.ledger").warning("ledger_reconnected", ledger=self.where)

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable:
        return LedgerUnavailable(f"state.url: lost the PostgreSQL ledger at {self.where}: {_reason(exc)}")

    def _run(self, call: Any) -> Any:
        """``call(connection)``; outside a write transaction a statement that met a dead connection is sent once
        more on a new one (a read, or one autocommitted write that cannot have taken effect)."""
        if self.kind == "postgresql" and (self._db.broken or self._db.closed):
            if self._in_write:
                raise self._unavailable(RuntimeError("the connection broke inside this transaction"))
            self._reconnect()
        try:
            return call(self._db)
        except self.errors as exc:
            if not self._lost(exc):
                raise
            if self._in_write:
                raise self._unavailable(exc) from None
        try:
            self._reconnect()
            return call(self._db)
        except self.errors as exc:
            if self._lost(exc):
                raise self._unavailable(exc) from None
            raise

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement (SQLite's spelling); returns a DB-API cursor (fetchone, fetchall, iteration)."""
        with self.lock:
            if self.kind == "sqlite":
                return self._db.execute(sql, tuple(params))
            statement = self._translate(sql)
            return self._run(lambda db: db.execute(statement, tuple(params)))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.lock:
            if self.kind == "sqlite":
                self._db.executemany(sql, rows)
            else:
                statement = self._translate(sql)

                def many(db: Any) -> None:
                    with db.cursor() as cur:
                        cur.executemany(statement, rows)
                self._run(many)

    def script(self, ddl: str) -> None:
        """Several DDL statements, no parameters, as they are (the engine's own spelling)."""
        with self.lock:
            if self.kind == "sqlite":
                self._db.executescript(ddl)
            else:
                self._run(lambda db: db.execute(ddl))

    @contextmanager
    def write(self) -> Iterator[Engine]:
        """One serialised write transaction (see the module's docstring): committed when the block ends, rolled
        back when it raises."""
        with self.lock:
            if self.kind == "sqlite":
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            else:
                # BEGIN and the lock run before any of the block: on a connection that died while idle they are
                # sent again on a new one; after them, a lost connection fails the whole transaction
                tx = self._run(_begin_locked)
                self._in_write = True
                try:
                    yield self
                except BaseException as exc:
                    self._in_write = False
                    if self._lost(exc):
                        _abandon(tx)
                        raise self._unavailable(exc) from None
                    tx.__exit__(type(exc), exc, exc.__traceback__)
                    raise
                self._in_write = False
                try:
                    tx.__exit__(None, None, None)
                except self.errors as exc:
                    if self._lost(exc):
                        raise self._unavailable(exc) from None
                    raise


def _begin_locked(db: Any) -> Any:
    """Open a transaction on ``db`` and take the ledger's write lock in it; returns the open transaction."""
    tx = db.transaction()
    tx.__enter__()
    try:
        db.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
    except BaseException as exc:
        _abandon(tx, exc)
        raise
    return tx


def _abandon(tx: Any, exc: BaseException | None = None) -> None:
    """Leave a transaction whose connection may be gone: the server rolls back what it never saw committed."""
    try:
        tx.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("abandoned"), None)
    except Exception:  # noqa: BLE001 - the connection is gone: there is nothing to roll back on it
        pass
