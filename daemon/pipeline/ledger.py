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

Only hashes are stored, never raw data or clear ids: of each forgotten instance, the hash of its id and
(schema 2) its *content hash* (:mod:`daemon.data.content`), which lets a rebase find it in a training
source. Schema 2 also records rebase jobs (``rebases``) and which requests a rebase made exact
(``exact``); a schema-1 file is migrated when it is opened (tables added, nothing rewritten), and its
instances forgotten before then have no content hash (a rebase refuses to run while any does).

WAL with ``synchronous=NORMAL`` survives process crashes (the case that matters here);
``synchronous=FULL`` is a setting away for power loss.
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

from daemon.pipeline.canonical import canonical_json
from daemon.pipeline.ledger_schema import MIGRATABLE as _MIGRATABLE, SCHEMA as _SCHEMA, SCHEMA_VERSION
from daemon.pipeline.ledger_schema import bind_id_key as _bind_id_key, migrate as _migrate

__all__ = [
    "GENESIS_HASH",
    "AuditProblem",
    "Delivery",
    "ForgottenContent",
    "Ledger",
    "LedgerError",
    "LedgerTransaction",
    "OutboxRow",
    "chain_hash",
    "verify_audit",
]

GENESIS_HASH = "0" * 64
# "stranded": accepted, then its round was lost and the broker could no longer redeliver its message
# (:mod:`daemon.pipeline.stranded`); its receipt is ``failed`` and a resubmission of its id is accepted anew
FINAL_STATUSES = ("applied", "rejected", "failed", "stranded")


_SQL_DELIVERY = 'INSERT OR REPLACE INTO deliveries VALUES (?, ?, ?, ?, ?, ?)'
_SQL_ACCEPT = ("INSERT INTO requests (request_id, model, kind, status, instances, received_at) "
               "VALUES (?, ?, ?, 'accepted', ?, ?) ON CONFLICT(request_id) DO UPDATE SET "
               "received_at=MIN(received_at, excluded.received_at), "
               # a stranded request resubmitted waits again (its deletion clock runs from the first receipt)
               "status='accepted', reason=NULL, round_id=NULL, model_version=NULL, finished_at=NULL, "
               "instances=excluded.instances, attempts=attempts + (status='stranded') "
               "WHERE requests.status IN ('accepted', 'stranded')")
_SQL_FINISH = ("INSERT INTO requests (request_id, model, kind, status, reason, round_id, model_version, "
               "received_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(request_id) DO UPDATE SET "
               "status=excluded.status, reason=excluded.reason, round_id=excluded.round_id, "
               "model_version=excluded.model_version, finished_at=excluded.finished_at")
_SQL_END_ROUND = "UPDATE rounds SET state=?, version=?, reason=?, finished_at=?, drafts=NULL WHERE round_id=?"
_SQL_FORGOTTEN = "INSERT OR IGNORE INTO forgotten VALUES (?, ?, ?)"
_SQL_FORGOTTEN_CONTENT = ("INSERT INTO forgotten_content (model, content_sha256, id_sha256, request_id, round_id, "
                          "kind, label, target, class) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SQL_END_REBASE = "UPDATE rebases SET state=?, version=?, reason=?, finished_at=?, drafts=NULL WHERE rebase_id=?"
_SQL_EXACT = "INSERT OR IGNORE INTO exact VALUES (?, ?, ?)"
_SQL_LAST_AUDIT = "SELECT entry, hash FROM audit ORDER BY entry DESC LIMIT 1"
_SQL_AUDIT = "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)"
_SQL_OUTBOX = "INSERT INTO outbox (topic, key, value, headers, created_at) VALUES (?, ?, ?, ?, ?)"
_REQUEST_COLUMNS = ("request_id", "model", "kind", "status", "reason", "round_id", "model_version", "instances",
                    "attempts", "received_at", "finished_at")
_IN_CHUNK = 500     # bound parameters per IN (...) lookup (SQLite's old limit is 999)


def _headers_json(headers: Sequence[tuple[str, bytes]]) -> str:
    return json.dumps([[n, v.decode("latin-1")] for n, v in headers]) if headers else "[]"


def _with_audit(receipt: Mapping[str, Any], body: bytes, audit: dict[str, Any]) -> bytes:
    """``canonical_json({**receipt, "audit": audit})``, given ``body`` = the receipt's canonical JSON without it.

    With sorted keys, "audit" comes first whenever every other key sorts after it (every receipt's does):
    then the bytes are the body's with the audit member spliced in front, and the receipt is not
    serialised a second time. Otherwise it is serialised in full.
    """
    others = [k for k in receipt if k != "audit"]
    if others and body[:1] == b"{" and all(isinstance(k, str) and k > "audit" for k in others):
        if set(audit) == {"entry", "hash", "prev_hash"} and type(audit["entry"]) is int and all(
                isinstance(audit[k], str) and audit[k].isalnum() and audit[k].isascii() for k in ("hash", "prev_hash")):
            # the same bytes as canonical_json(audit), without the encoder: an int and two hex digests
            block = f'{{"entry":{audit["entry"]},"hash":"{audit["hash"]}","prev_hash":"{audit["prev_hash"]}"}}'.encode()
        else:
            block = canonical_json(audit)
        return b'{"audit":' + block + b"," + body[1:]
    return canonical_json({**receipt, "audit": audit})


@dataclass(frozen=True)
class ForgottenContent:
    """One forgotten instance as a rebase needs it: its content hash and how the round that forgot it used it."""

    content_sha256: str
    id_sha256: str
    request_id: str
    round_id: str
    kind: str
    label: int
    target: int | None = None
    forget_class: int | None = None
    seq: int = 0                # the ledger's commit order (0 until it is written)


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
            elif int(row[0]) in _MIGRATABLE:
                with self._immediate():
                    _migrate(self._db, int(row[0]))
                    self._db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: ledger schema {row[0]}, this unlearnd reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: not a usable ledger: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def bind_id_key(self, key_id: str) -> int:
        """Issue 23: the id key this ledger's digests are made under (recorded on first use; another one raises
        ``ledger_schema.IdKeyMismatch``); returns how many rows keep plain digests from before schema 3."""
        with self._immediate() as db:
            return _bind_id_key(db, key_id, str(self.path))

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def transaction(self) -> Iterator[LedgerTransaction]:
        """All writes of one decision, or none of them: the writes are issued when the block ends, then committed."""
        with self._immediate() as db:
            tx = LedgerTransaction(db)
            yield tx
            tx.flush()

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

    def instances_of(self, request_ids: Sequence[str]) -> int | None:
        """How many instances these requests carried, or None when the ledger does not know every one of them
        (another daemon's requests, a lost state directory): the deletions count of a version written before
        manifests recorded it (:func:`daemon.registry.lineage.deletions_since_base`)."""
        ids = sorted(set(request_ids))
        known, total = 0, 0
        with self._lock:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start:start + _IN_CHUNK]
                row = self._db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(instances), 0) FROM requests WHERE request_id IN "
                    f"({','.join('?' * len(chunk))}) AND instances > 0", chunk).fetchone()
                known, total = known + int(row[0]), total + int(row[1])
        return total if known == len(ids) else None

    def accepted_requests(self) -> list[dict[str, Any]]:
        """Every request accepted and not yet decided (request_id, model, kind, received_at): the ones a round,
        or a redelivery of their message, still owes an outcome (:mod:`daemon.pipeline.stranded`)."""
        with self._lock:
            rows = self._db.execute("SELECT request_id, model, kind, received_at FROM requests "
                                    "WHERE status='accepted'").fetchall()
        return [{"request_id": r[0], "model": r[1], "kind": r[2], "received_at": float(r[3])} for r in rows]

    def accepted_deliveries(self, request_ids: Sequence[str]) -> dict[str, tuple[str, int, int, str]]:
        """Where each request's accepting message was: (topic, partition, offset, fingerprint), the newest row when
        a resubmission was accepted too; a request absent from the answer lost its row to a new message at the same
        offset (a broker that lost its log).
        A scan of the deliveries (no index on request_id): called for new orphans only, not per poll."""
        ids, out = list(dict.fromkeys(request_ids)), {}
        with self._lock:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start:start + _IN_CHUNK]
                for topic, partition, offset, fp, rid in self._db.execute(
                        f'SELECT topic, partition, "offset", fingerprint, request_id FROM deliveries WHERE '
                        f"effect='accepted' AND request_id IN ({', '.join('?' * len(chunk))}) ORDER BY rowid", chunk):
                    out[rid] = (topic, int(partition), int(offset), fp)
        return out

    def last_round_of(self, request_id: str) -> str | None:
        """The newest round that held the request (none: it never reached one)."""
        with self._lock:
            row = self._db.execute("SELECT round_id FROM rounds WHERE instr(request_ids, ?) > 0 "
                                   "ORDER BY started_at DESC LIMIT 1", (json.dumps(request_id),)).fetchone()
        return None if row is None else row[0]

    # -- rounds -------------------------------------------------------------------------------------
    def allocate_round(self, model: str, owner: str, request_ids: Sequence[str]) -> str:
        """A new round id (``r-000042``), recorded as running before any work."""
        with self._immediate() as db:
            n = int(db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]) + 1
            round_id = f"r-{n:06d}"
            db.execute("INSERT INTO rounds (round_id, model, owner, state, request_ids, started_at) "
                       "VALUES (?, ?, ?, 'running', ?, ?)", (round_id, model, owner, json.dumps(list(request_ids)),
                                                              time.time()))
        return round_id

    def begin_commit(self, round_id: str, parent: int, drafts: Sequence[Mapping[str, Any]]) -> None:
        """Record the intent before the registry write, so a crash in between can be resolved."""
        with self._immediate() as db:
            db.execute("UPDATE rounds SET state='committing', parent=?, drafts=? WHERE round_id=?",
                       (parent, json.dumps(list(drafts)), round_id))

    def rounds_in_state(self, state: str, owner: str) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute("SELECT round_id, model, parent, request_ids, drafts FROM rounds "
                                   "WHERE state=? AND owner=?", (state, owner))
            return [{"round_id": r[0], "model": r[1], "parent": r[2], "request_ids": json.loads(r[3]),
                     "drafts": json.loads(r[4]) if r[4] else []} for r in cur.fetchall()]

    def round_state(self, round_id: str) -> str | None:
        """The state of a round, or of a rebase (a version's manifest names either by its ``round_id``)."""
        with self._lock:
            row = self._db.execute("SELECT state FROM rounds WHERE round_id=?", (round_id,)).fetchone()
            if row is None:
                row = self._db.execute("SELECT state FROM rebases WHERE rebase_id=?", (round_id,)).fetchone()
        return None if row is None else row[0]

    def last_committed_version(self, model: str) -> int | None:
        """The highest version this ledger committed for ``model``, by a round or a rebase."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(v) FROM (SELECT MAX(version) AS v FROM rounds WHERE model=? AND state='committed' "
                "UNION ALL SELECT MAX(version) FROM rebases WHERE model=? AND state='committed')",
                (model, model)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    # -- forgotten content and rebases --------------------------------------------------------------------
    def forgotten_content(self, model: str, *, after_seq: int = 0, upto_seq: int | None = None
                          ) -> list[ForgottenContent]:
        """The model's forgotten instances with content hashes, in commit order, ``after_seq < seq <= upto_seq``."""
        upto = (1 << 62) if upto_seq is None else upto_seq
        with self._lock:
            rows = self._db.execute(
                "SELECT content_sha256, id_sha256, request_id, round_id, kind, label, target, class, seq "
                "FROM forgotten_content WHERE model=? AND seq>? AND seq<=? ORDER BY seq",
                (model, after_seq, upto)).fetchall()
        return [ForgottenContent(*r) for r in rows]

    def forgotten_since_last_rebase(self, model: str) -> int:
        """Instances of ``model`` forgotten after the snapshot of its last rebase that ended (committed or failed):
        what a rebase policy counts, so a rebase that failed is not retried until something new was forgotten."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM forgotten_content WHERE model=? AND seq > COALESCE((SELECT MAX(snapshot_seq) "
                "FROM rebases WHERE model=? AND state IN ('committed', 'failed')), 0)", (model, model)).fetchone()
        return int(row[0])

    def content_seq(self, model: str) -> int:
        """The commit order of the model's newest forgotten instance (0: none): what a rebase snapshots."""
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM forgotten_content WHERE model=?", (model,)).fetchone()
        return int(row[0] or 0)

    def forgotten_without_content(self, model: str) -> int:
        """Forgotten instances of ``model`` with no content hash (committed before schema 2): no rebase can find
        them in a source, so none may run while there are any."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM forgotten f WHERE f.model=? AND NOT EXISTS (SELECT 1 FROM forgotten_content c "
                "WHERE c.model=f.model AND c.id_sha256=f.id_sha256 AND c.round_id=f.round_id)", (model,)).fetchone()
        return int(row[0])

    def request_rebase(self, model: str, trigger: str) -> tuple[str, bool]:
        """A rebase of ``model`` waiting to run: the one already requested or running, else a new one.

        Returns (rebase id, whether it is new). Written by ``unlearnd rebase`` (any process: SQLite serialises
        it with the daemon's writes) and by the daemon's own policy.
        """
        with self._immediate() as db:
            row = db.execute("SELECT rebase_id FROM rebases WHERE model=? AND state IN "
                             "('requested', 'running', 'committing') ORDER BY requested_at LIMIT 1",
                             (model,)).fetchone()
            if row is not None:
                return row[0], False
            n = int(db.execute("SELECT COUNT(*) FROM rebases").fetchone()[0]) + 1
            rebase_id = f"rb-{n:06d}"
            db.execute("INSERT INTO rebases (rebase_id, model, state, trigger, requested_at) "
                       "VALUES (?, ?, 'requested', ?, ?)", (rebase_id, model, trigger, time.time()))
        return rebase_id, True

    def rebases(self, *, model: str | None = None, states: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Rebase jobs (oldest first), of one model and in some states when given."""
        sql, args = "SELECT * FROM rebases WHERE 1=1", []
        if model is not None:
            sql, args = sql + " AND model=?", [model]
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += list(states)
        with self._lock:
            cur = self._db.execute(sql + " ORDER BY requested_at, rebase_id", args)
            cols = [c[0] for c in cur.description]
            out = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        for r in out:
            r["drafts"] = json.loads(r["drafts"]) if r["drafts"] else {}
        return out

    def claim_rebase(self, rebase_id: str, owner: str) -> bool:
        """Take a requested rebase for ``owner`` (False: another daemon sharing this ledger took it first)."""
        with self._immediate() as db:
            cur = db.execute("UPDATE rebases SET state='running', owner=? WHERE rebase_id=? AND state='requested'",
                             (owner, rebase_id))
            return cur.rowcount == 1

    def start_rebase(self, rebase_id: str, owner: str, *, base_version: int, snapshot_seq: int, forgotten: int,
                     excluded: int, digest: str) -> None:
        """The job runs from now on: its snapshot of the forgotten set is durable before training starts."""
        with self._immediate() as db:
            db.execute("UPDATE rebases SET state='running', owner=?, attempts=attempts+1, base_version=?, "
                       "snapshot_seq=?, forgotten=?, excluded=?, digest=?, started_at=?, reason=NULL "
                       "WHERE rebase_id=?",
                       (owner, base_version, snapshot_seq, forgotten, excluded, digest, time.time(), rebase_id))

    def begin_rebase_commit(self, rebase_id: str, parent: int, covered_seq: int, drafts: Mapping[str, Any]) -> None:
        """Record the intent before the registry write (as :meth:`begin_commit` does for a round)."""
        with self._immediate() as db:
            db.execute("UPDATE rebases SET state='committing', base_version=?, covered_seq=?, drafts=? "
                       "WHERE rebase_id=?", (parent, covered_seq, json.dumps(dict(drafts)), rebase_id))

    def restart_rebase(self, rebase_id: str, reason: str) -> None:
        """A job cut short (a crash, a stop) waits to run again from scratch."""
        with self._immediate() as db:
            db.execute("UPDATE rebases SET state='requested', reason=?, drafts=NULL, covered_seq=NULL "
                       "WHERE rebase_id=?", (reason, rebase_id))

    def exact_requests(self, request_ids: Iterable[str]) -> set[str]:
        """Which of these requests a committed rebase already made exact."""
        ids, out = list(dict.fromkeys(request_ids)), set()
        with self._lock:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start:start + _IN_CHUNK]
                out.update(r[0] for r in self._db.execute(
                    f"SELECT request_id FROM exact WHERE request_id IN ({', '.join('?' * len(chunk))})", chunk))
        return out

    # -- the outbox -------------------------------------------------------------------------------------
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
            with self._immediate() as db:
                db.executemany("DELETE FROM outbox WHERE seq=?", [(s,) for s in seqs])

    def replace_outbox_value(self, seq: int, value: bytes, headers: Sequence[tuple[str, bytes]]) -> None:
        """Rewrite one waiting row (an oversized receipt published as its headers only)."""
        with self._immediate() as db:
            db.execute("UPDATE outbox SET value=?, headers=? WHERE seq=?", (value, _headers_json(headers), seq))

    def audit_entries(self) -> Iterator[tuple[int, str | None, str, bytes, str, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT entry, request_id, status, body, prev_hash, hash FROM audit ORDER BY entry").fetchall()
        yield from rows

    def verify_audit(self) -> tuple[int, AuditProblem | None]:
        return verify_audit(self.audit_entries())


class LedgerTransaction:
    """The writes of one decision (an intake poll, a round's outcome), issued together inside its transaction.

    The one write API of the ledger: :meth:`Ledger.transaction` yields it and flushes it before committing.
    Reads come first and in bulk (:meth:`load`: one range query per partition for the deliveries, ``IN``
    lookups for the request ids); every write is then buffered and answered from memory when the same
    transaction reads it back (a request id that appears twice in one poll is a duplicate the second time);
    :meth:`flush` issues them with ``executemany`` in the order they were made, before the transaction
    commits. The audit chain is continued from the last entry read once, inside the transaction (which
    holds SQLite's write lock, so no other writer can append in between). An intake poll decides hundreds of
    messages this way in one transaction, with a handful of statements.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._deliveries: dict[tuple[str, int, int], Delivery] = {}
        self._requests: dict[str, dict[str, Any] | None] = {}
        self._row_ops: list[tuple[str, tuple[Any, ...]]] = []      # requests, rounds, forgotten: in order
        self._delivery_rows: list[tuple[Any, ...]] = []
        self._audit_rows: list[tuple[Any, ...]] = []
        self._outbox_rows: list[tuple[Any, ...]] = []
        last = db.execute(_SQL_LAST_AUDIT).fetchone()
        self._entry, self._prev = (0, GENESIS_HASH) if last is None else (last[0], last[1])

    # -- reads --------------------------------------------------------------------------------------
    def load(self, deliveries: Iterable[tuple[str, int, int]], request_ids: Iterable[str]) -> None:
        """Read what the ledger holds for these (topic, partition, offset)s and request ids."""
        wanted: dict[tuple[str, int], set[int]] = {}
        for topic, partition, offset in deliveries:
            wanted.setdefault((topic, partition), set()).add(offset)
        for (topic, partition), offsets in wanted.items():
            rows = self.db.execute(
                'SELECT d."offset", d.fingerprint, d.request_id, d.effect, r.status FROM deliveries d '
                'LEFT JOIN requests r ON r.request_id = d.request_id '
                'WHERE d.topic=? AND d.partition=? AND d."offset" BETWEEN ? AND ?',
                (topic, partition, min(offsets), max(offsets))).fetchall()
            for off, fp, rid, effect, status in rows:
                if off in offsets:
                    self._deliveries[(topic, partition, off)] = Delivery(fp, rid, effect, status)
        ids = [i for i in dict.fromkeys(request_ids) if i not in self._requests]
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start:start + _IN_CHUNK]
            for i in chunk:
                self._requests[i] = None
            cur = self.db.execute(f"SELECT {', '.join(_REQUEST_COLUMNS)} FROM requests WHERE request_id IN "
                                  f"({', '.join('?' * len(chunk))})", chunk)
            for row in cur.fetchall():
                self._requests[row[0]] = dict(zip(_REQUEST_COLUMNS, row, strict=True))

    def forgotten_before(self, model: str, id_hashes: Sequence[str]) -> dict[str, tuple[int, str, int | None]]:
        """Instances of ``model`` a committed round already forgot, by id hash: (the label it was forgotten as, that
        round, the version it made), the newest when several did. One indexed lookup (model, id_sha256)."""
        ids, out = list(dict.fromkeys(id_hashes)), {}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start:start + _IN_CHUNK]
            for h, label, round_id, version in self.db.execute(
                    f"SELECT c.id_sha256, c.label, c.round_id, r.version FROM forgotten_content c LEFT JOIN rounds r "
                    f"ON r.round_id = c.round_id WHERE c.model=? AND c.id_sha256 IN ({', '.join('?' * len(chunk))}) "
                    f"ORDER BY c.seq", [model, *chunk]):
                out[h] = (int(label), round_id, None if version is None else int(version))
        return out

    def delivery(self, topic: str, partition: int, offset: int) -> Delivery | None:
        """What :meth:`load` found (or this transaction recorded) for that offset; None if nothing."""
        return self._deliveries.get((topic, partition, offset))

    def request(self, request_id: str) -> dict[str, Any] | None:
        """The request's row as this transaction leaves it (read from the ledger if :meth:`load` did not)."""
        if request_id not in self._requests:
            self.load((), [request_id])
        row = self._requests[request_id]
        return None if row is None else dict(row)

    # -- writes (buffered) --------------------------------------------------------------------------
    def record_delivery(self, topic: str, partition: int, offset: int, fingerprint: str, request_id: str | None,
                        effect: str) -> None:
        self._delivery_rows.append((topic, partition, offset, fingerprint, request_id, effect))
        status = (self._requests.get(request_id) or {}).get("status") if request_id is not None else None
        self._deliveries[(topic, partition, offset)] = Delivery(fingerprint, request_id, effect, status)

    def accept(self, request_id: str, model: str, kind: str, instances: int, received_at: float) -> None:
        """A valid request waits for its round (kept across a crash only as this row: Kafka holds its data)."""
        self._row_ops.append((_SQL_ACCEPT, (request_id, model, kind, instances, received_at)))
        row = self.request(request_id)
        if row is None:
            row = dict.fromkeys(_REQUEST_COLUMNS)
            row.update(request_id=request_id, model=model, kind=kind, status="accepted", instances=instances,
                       attempts=0, received_at=received_at)
        elif row["status"] in ("accepted", "stranded"):
            row.update(received_at=min(row["received_at"], received_at), status="accepted", reason=None,
                       round_id=None, model_version=None, finished_at=None, instances=instances)
        self._requests[request_id] = row

    def finish(self, request_id: str, status: str, *, model: str | None = None, kind: str | None = None,
               reason: str | None = None, round_id: str | None = None, model_version: int | None = None,
               received_at: float | None = None) -> None:
        if status not in FINAL_STATUSES:
            raise ValueError(f"not a final status: {status}")
        now = time.time()
        self._row_ops.append((_SQL_FINISH, (request_id, model, kind, status, reason, round_id, model_version,
                                            received_at or now, now)))
        row = self.request(request_id)
        if row is None:
            row = dict.fromkeys(_REQUEST_COLUMNS)
            row.update(request_id=request_id, model=model, kind=kind, instances=0, attempts=0,
                       received_at=received_at or now)
        row.update(status=status, reason=reason, round_id=round_id, model_version=model_version, finished_at=now)
        self._requests[request_id] = row

    def end_round(self, round_id: str, state: str, *, version: int | None = None, reason: str | None = None
                  ) -> None:
        self._row_ops.append((_SQL_END_ROUND, (state, version, reason, time.time(), round_id)))

    def add_forgotten(self, model: str, id_hashes: Iterable[str], round_id: str) -> None:
        self._row_ops.extend((_SQL_FORGOTTEN, (model, h, round_id)) for h in id_hashes)

    def add_forgotten_content(self, model: str, rows: Iterable[ForgottenContent]) -> None:
        """Content hashes of a committed round's instances (with what a re-application needs: kind, label...)."""
        self._row_ops.extend((_SQL_FORGOTTEN_CONTENT, (model, r.content_sha256, r.id_sha256, r.request_id,
                                                       r.round_id, r.kind, r.label, r.target, r.forget_class))
                             for r in rows)

    def end_rebase(self, rebase_id: str, state: str, *, version: int | None = None, reason: str | None = None
                   ) -> None:
        self._row_ops.append((_SQL_END_REBASE, (state, version, reason, time.time(), rebase_id)))

    def mark_exact(self, request_id: str, rebase_id: str, version: int) -> None:
        self._row_ops.append((_SQL_EXACT, (request_id, rebase_id, version)))

    def append_receipt(self, receipt: dict[str, Any], topic: str) -> dict[str, Any]:
        """Chain the receipt into the audit trail and queue it for publication; returns it with ``audit``."""
        body, audit = self._chain(receipt)
        key = receipt.get("request_id")
        self.enqueue(topic, key.encode() if isinstance(key, str) else None, _with_audit(receipt, body, audit))
        return {**receipt, "audit": audit}

    def append_audit(self, event: dict[str, Any]) -> dict[str, Any]:
        """Chain an event that is no request's receipt (a rebase's outcome) into the audit trail only."""
        _body, audit = self._chain(event)
        return {**event, "audit": audit}

    def _chain(self, receipt: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
        body = canonical_json({k: v for k, v in receipt.items() if k != "audit"})
        entry, prev = self._entry + 1, self._prev
        digest = chain_hash(prev, body)
        self._audit_rows.append((entry, receipt.get("request_id"), receipt["status"], body, prev, digest,
                                 time.time()))
        self._entry, self._prev = entry, digest
        return body, {"entry": entry, "hash": digest, "prev_hash": prev}

    def enqueue(self, topic: str, key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]] = ()) -> None:
        self._outbox_rows.append((topic, key, value, _headers_json(headers), time.time()))

    def flush(self) -> None:
        """Issue the buffered writes (call inside the transaction, before it commits)."""
        db = self.db
        i, ops = 0, self._row_ops
        while i < len(ops):       # consecutive statements of one kind go together, in order
            j = i
            while j < len(ops) and ops[j][0] == ops[i][0]:
                j += 1
            db.executemany(ops[i][0], [params for _, params in ops[i:j]])
            i = j
        if self._delivery_rows:
            db.executemany(_SQL_DELIVERY, self._delivery_rows)
        if self._audit_rows:
            db.executemany(_SQL_AUDIT, self._audit_rows)
        if self._outbox_rows:
            db.executemany(_SQL_OUTBOX, self._outbox_rows)
        self._row_ops, self._delivery_rows, self._audit_rows, self._outbox_rows = [], [], [], []


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
