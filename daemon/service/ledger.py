"""The ledger: the daemon's durable memory, one SQLite file in WAL mode.

What it must make true across kill -9 at any instant:

* every request that reached the topic gets exactly one receipt of its own outcome; a replay of a
  known request id gets ``duplicate`` — so each consumed message (topic, partition, offset) is
  recorded with its effect in one transaction, and a redelivery after a crash is recognised;
* receipts are never lost while the broker is away — they go to an **outbox** in the same
  transaction that decides them, and leave it only once the broker acknowledged them;
* the audit trail is append-only and hash-chained — it lives in the same file (triggers refuse
  UPDATE and DELETE), so an entry exists exactly when its receipt does;
* a round is recorded as ``committing`` *before* its version is written to the registry, and as
  ``committed`` after: a crash in between is resolved at start-up by looking for the round's id in
  the registry (roll forward) or abandoning it (its messages were never committed, so Kafka
  redelivers them).

Only hashes of instance ids are stored, never raw data or clear ids. WAL with ``synchronous=NORMAL``
survives process crashes (the case that matters here); ``synchronous=FULL`` is a setting away for
power loss.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.service.codec import canonical_json

__all__ = [
    "GENESIS_HASH",
    "AuditProblem",
    "Delivery",
    "Ledger",
    "LedgerError",
    "OutboxRow",
    "chain_hash",
    "verify_audit",
]

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64
FINAL_STATUSES = ("applied", "rejected", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id   TEXT PRIMARY KEY,
    model        TEXT,
    kind         TEXT,
    status       TEXT NOT NULL,             -- accepted | applied | rejected | failed
    reason       TEXT,
    round_id     TEXT,
    model_version INTEGER,
    instances    INTEGER NOT NULL DEFAULT 0,
    attempts     INTEGER NOT NULL DEFAULT 0,
    received_at  REAL NOT NULL,
    finished_at  REAL
);
CREATE INDEX IF NOT EXISTS requests_status ON requests(status);
CREATE TABLE IF NOT EXISTS deliveries (
    topic      TEXT NOT NULL,
    partition  INTEGER NOT NULL,
    "offset"   INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,              -- sha256 of timestamp, key and value: tells a redelivery from a
                                            -- new message at a reused offset (a broker that lost its log)
    request_id TEXT,                        -- NULL when none could be read
    effect     TEXT NOT NULL,               -- accepted | rejected | duplicate
    PRIMARY KEY (topic, partition, "offset")
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id   TEXT PRIMARY KEY,
    model      TEXT NOT NULL,
    owner      TEXT NOT NULL,               -- the daemon instance running it (recovery touches only its own)
    state      TEXT NOT NULL,               -- running | committing | committed | failed | aborted | abandoned
    parent     INTEGER,
    version    INTEGER,
    request_ids TEXT NOT NULL,              -- JSON list
    drafts     TEXT,                        -- JSON: receipts to emit on commit, without version fields
    reason     TEXT,
    started_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS forgotten (
    model     TEXT NOT NULL,
    id_sha256 TEXT NOT NULL,
    round_id  TEXT NOT NULL,
    PRIMARY KEY (model, id_sha256, round_id)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT NOT NULL,
    key        BLOB,
    value      BLOB NOT NULL,
    headers    TEXT NOT NULL,               -- JSON list of [name, value-as-latin1]
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    entry      INTEGER PRIMARY KEY,
    request_id TEXT,
    status     TEXT NOT NULL,
    body       BLOB NOT NULL,               -- canonical JSON of the receipt without its "audit" field
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


class LedgerError(RuntimeError):
    """The ledger file is unusable or disagrees with itself."""


@dataclass(frozen=True)
class Delivery:
    """What a consumed message already did (found again after a redelivery)."""

    fingerprint: str
    request_id: str | None
    effect: str
    request_status: str | None


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class AuditProblem:
    """The first entry of the audit trail that does not verify."""

    entry: int
    reason: str


def chain_hash(prev_hash: str, body: bytes) -> str:
    """An entry's hash covers the previous entry's hash, so removing or changing any entry shows."""
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + body).hexdigest()


class Ledger:
    """One SQLite file; safe to share between threads (one connection, serialised by a lock)."""

    def __init__(self, path: Path | str, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: ledger schema {row[0]}, this unlearnd reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: not a usable ledger: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes of one decision, or none of them."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- deliveries and requests --------------------------------------------------------------------
    def delivery(self, topic: str, partition: int, offset: int) -> Delivery | None:
        with self._lock:
            row = self._db.execute(
                'SELECT d.fingerprint, d.request_id, d.effect, r.status FROM deliveries d LEFT JOIN requests r '
                'ON r.request_id = d.request_id WHERE d.topic=? AND d.partition=? AND d."offset"=?',
                (topic, partition, offset)).fetchone()
        return None if row is None else Delivery(row[0], row[1], row[2], row[3])

    def request(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            cur = self._db.execute("SELECT * FROM requests WHERE request_id=?", (request_id,))
            row = cur.fetchone()
            return None if row is None else dict(zip([c[0] for c in cur.description], row, strict=True))

    @staticmethod
    def record_delivery(db: sqlite3.Connection, topic: str, partition: int, offset: int, fingerprint: str,
                        request_id: str | None, effect: str) -> None:
        db.execute('INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?, ?)',
                   (topic, partition, offset, fingerprint, request_id, effect))

    @staticmethod
    def accept(db: sqlite3.Connection, request_id: str, model: str, kind: str, instances: int,
               received_at: float) -> None:
        """A valid request waits for its round (kept across a crash only as this row: Kafka holds its data)."""
        db.execute("INSERT INTO requests (request_id, model, kind, status, instances, received_at) "
                   "VALUES (?, ?, ?, 'accepted', ?, ?) ON CONFLICT(request_id) DO UPDATE SET "
                   "received_at=MIN(received_at, excluded.received_at)",
                   (request_id, model, kind, instances, received_at))

    @staticmethod
    def finish(db: sqlite3.Connection, request_id: str, status: str, *, model: str | None = None,
               kind: str | None = None, reason: str | None = None, round_id: str | None = None,
               model_version: int | None = None, received_at: float | None = None) -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status}")
        now = time.time()
        db.execute(
            "INSERT INTO requests (request_id, model, kind, status, reason, round_id, model_version, "
            "received_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(request_id) DO UPDATE SET "
            "status=excluded.status, reason=excluded.reason, round_id=excluded.round_id, "
            "model_version=excluded.model_version, finished_at=excluded.finished_at",
            (request_id, model, kind, status, reason, round_id, model_version, received_at or now, now))

    def pending_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute("SELECT request_id, model, received_at FROM requests WHERE status='accepted'")
            return [{"request_id": r[0], "model": r[1], "received_at": r[2]} for r in cur.fetchall()]

    def status_counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            rows = self._db.execute("SELECT kind, status, COUNT(*) FROM requests GROUP BY kind, status").fetchall()
        return {(k or "unknown", s): n for k, s, n in rows}

    # -- rounds -------------------------------------------------------------------------------------
    def allocate_round(self, model: str, owner: str, request_ids: Sequence[str]) -> str:
        """A new round id (``r-000042``), recorded as running before any work."""
        with self.transaction() as db:
            n = int(db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]) + 1
            round_id = f"r-{n:06d}"
            db.execute("INSERT INTO rounds (round_id, model, owner, state, request_ids, started_at) "
                       "VALUES (?, ?, ?, 'running', ?, ?)", (round_id, model, owner, json.dumps(list(request_ids)),
                                                              time.time()))
        return round_id

    def begin_commit(self, round_id: str, parent: int, drafts: Sequence[Mapping[str, Any]]) -> None:
        """Record the intent before the registry write, so a crash in between can be resolved."""
        with self.transaction() as db:
            db.execute("UPDATE rounds SET state='committing', parent=?, drafts=? WHERE round_id=?",
                       (parent, json.dumps(list(drafts)), round_id))

    @staticmethod
    def end_round(db: sqlite3.Connection, round_id: str, state: str, *, version: int | None = None,
                  reason: str | None = None) -> None:
        db.execute("UPDATE rounds SET state=?, version=?, reason=?, finished_at=?, drafts=NULL WHERE round_id=?",
                   (state, version, reason, time.time(), round_id))

    def rounds_in_state(self, state: str, owner: str) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute("SELECT round_id, model, parent, request_ids, drafts FROM rounds "
                                   "WHERE state=? AND owner=?", (state, owner))
            return [{"round_id": r[0], "model": r[1], "parent": r[2], "request_ids": json.loads(r[3]),
                     "drafts": json.loads(r[4]) if r[4] else []} for r in cur.fetchall()]

    def round_state(self, round_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM rounds WHERE round_id=?", (round_id,)).fetchone()
        return None if row is None else row[0]

    def last_committed_version(self, model: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MAX(version) FROM rounds WHERE model=? AND state='committed'",
                                   (model,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @staticmethod
    def add_forgotten(db: sqlite3.Connection, model: str, id_hashes: Iterable[str], round_id: str) -> None:
        db.executemany("INSERT OR IGNORE INTO forgotten VALUES (?, ?, ?)",
                       [(model, h, round_id) for h in id_hashes])

    # -- receipts: audit + outbox -------------------------------------------------------------------
    @staticmethod
    def append_receipt(db: sqlite3.Connection, receipt: dict[str, Any], topic: str) -> dict[str, Any]:
        """Chain the receipt into the audit trail and queue it for publication; returns it with ``audit``."""
        body = canonical_json({k: v for k, v in receipt.items() if k != "audit"})
        last = db.execute("SELECT entry, hash FROM audit ORDER BY entry DESC LIMIT 1").fetchone()
        entry, prev = (1, GENESIS_HASH) if last is None else (last[0] + 1, last[1])
        digest = chain_hash(prev, body)
        db.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (entry, receipt.get("request_id"), receipt["status"], body, prev, digest, time.time()))
        full = {**receipt, "audit": {"entry": entry, "hash": digest, "prev_hash": prev}}
        key = receipt.get("request_id")
        Ledger.enqueue(db, topic, key.encode() if isinstance(key, str) else None, canonical_json(full))
        return full

    @staticmethod
    def enqueue(db: sqlite3.Connection, topic: str, key: bytes | None, value: bytes,
                headers: Sequence[tuple[str, bytes]] = ()) -> None:
        db.execute("INSERT INTO outbox (topic, key, value, headers, created_at) VALUES (?, ?, ?, ?, ?)",
                   (topic, key, value, json.dumps([[n, v.decode("latin-1")] for n, v in headers]), time.time()))

    def outbox(self, limit: int = 500) -> list[OutboxRow]:
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, key, value, headers FROM outbox ORDER BY seq LIMIT ?",
                                    (limit,)).fetchall()
        return [OutboxRow(r[0], r[1], r[2], r[3], [(n, v.encode("latin-1")) for n, v in json.loads(r[4])])
                for r in rows]

    def outbox_size(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def acknowledge(self, seqs: Iterable[int]) -> None:
        seqs = list(seqs)
        if seqs:
            with self.transaction() as db:
                db.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in seqs])

    def audit_entries(self) -> Iterator[tuple[int, str | None, str, bytes, str, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT entry, request_id, status, body, prev_hash, hash FROM audit ORDER BY entry").fetchall()
        yield from rows

    def verify_audit(self) -> tuple[int, AuditProblem | None]:
        return verify_audit(self.audit_entries())


def verify_audit(entries: Iterable[tuple[int, str | None, str, bytes, str, str]]) -> tuple[int, AuditProblem | None]:
    """Walk the chain; returns (entries checked, the first problem or None)."""
    prev, expected, count = GENESIS_HASH, 1, 0
    for entry, _request_id, status, body, prev_hash, digest in entries:
        if entry != expected:
            return count, AuditProblem(expected, f"entry {expected} is missing (next is {entry})")
        if prev_hash != prev:
            return count, AuditProblem(entry, "prev_hash does not match the previous entry's hash")
        body = body.encode() if isinstance(body, str) else bytes(body)   # a hand-edited row may hold text
        if chain_hash(prev_hash, body) != digest:
            return count, AuditProblem(entry, "hash does not match the entry's content")
        try:
            parsed = json.loads(body)
        except ValueError:
            return count, AuditProblem(entry, "body is not JSON")
        if parsed.get("status") != status:
            return count, AuditProblem(entry, "status column differs from the receipt")
        prev, expected, count = digest, expected + 1, count + 1
    return count, None
