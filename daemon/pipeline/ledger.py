"""The ledger: the daemon's durable memory, one SQLite file in WAL mode (the embedded default) or one PostgreSQL
database (``[state] url``, issue 24), with the same guarantees on both (:mod:`daemon.pipeline.ledger_sql`).

What it must make true across kill -9 at any instant:

* every request that reached the topic gets exactly one receipt of its own outcome; a replay of a
  known request id gets ``duplicate`` — so each consumed message (topic, partition, offset) is
  recorded with its effect in one transaction, and a redelivery after a crash is recognised;
* receipts are never lost while the broker is away — they go to an **outbox** in the same
  transaction that decides them, and leave it only once the broker acknowledged them;
* the audit trail is append-only and hash-chained — it lives in the same database (triggers refuse
  UPDATE and DELETE, and in PostgreSQL TRUNCATE), so an entry exists exactly when its receipt does;
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
``synchronous=FULL`` is a setting away for power loss. PostgreSQL commits durably (its own settings).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.pipeline.ledger_schema import MIGRATABLE as _MIGRATABLE, SCHEMA as _SCHEMA, SCHEMA_VERSION
from daemon.pipeline.ledger_schema import bind_id_key as _bind_id_key, migrate as _migrate
from daemon.pipeline import ownership as _ownership
from daemon.pipeline.ledger_sql import Engine, EngineError, LedgerUnavailable, postgres_schema
from daemon.pipeline.ledger_tx import _IN_CHUNK, FINAL_STATUSES, GENESIS_HASH, Delivery, ForgottenContent
from daemon.pipeline.ledger_tx import LedgerTransaction, _headers_json, chain_hash

__all__ = [
    "FINAL_STATUSES",
    "GENESIS_HASH",
    "AuditProblem",
    "Delivery",
    "ForgottenContent",
    "Ledger",
    "LedgerError",
    "LedgerTransaction",
    "LedgerUnavailable",
    "OutboxRow",
    "chain_hash",
    "verify_audit",
]

class LedgerError(RuntimeError):
    """The ledger file is unusable or disagrees with itself."""


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


class Ledger:
    """The ledger on one engine: a SQLite file (``Ledger(path)``) or a PostgreSQL database
    (``Ledger("postgresql://...")``, :mod:`daemon.pipeline.ledger_sql`); safe to share between threads (one
    connection, serialised by a lock)."""

    def __init__(self, target: Path | str, *, synchronous: str = "NORMAL") -> None:
        try:
            self._db = Engine.open(target, synchronous=synchronous)
        except EngineError as exc:
            raise LedgerError(str(exc)) from None
        #: "sqlite" or "postgresql"; where: the file, or the URL without its password (for messages)
        self.engine, self.where = self._db.kind, self._db.where
        self.path: Path | None = Path(target) if self.engine == "sqlite" else None
        self._lock = self._db.lock
        try:
            if self.engine == "sqlite":
                self._db.script(_SCHEMA)        # executescript commits first: outside the transaction
                with self._db.write():
                    self._check_version()
            else:                               # two daemons starting at once: the write lock serialises the DDL
                with self._db.write():
                    self._db.script(postgres_schema(_SCHEMA))
                    self._check_version()
        except self._db.errors as exc:
            self._db.close()
            raise LedgerError(f"{self.where}: not a usable ledger: {exc}") from exc
        except LedgerError:
            self._db.close()
            raise

    def _check_version(self) -> None:
        """Schema versions: a new ledger records this one; an older one is migrated (:func:`ledger_schema.migrate`,
        idempotent, inside the open's transaction); a newer one is refused."""
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) in _MIGRATABLE:
            _migrate(self._db, int(row[0]))
            self._db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise LedgerError(f"{self.where}: ledger schema {row[0]}, this unlearnd reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def bind_id_key(self, key_id: str) -> int:
        """Issue 23: the id key this ledger's digests are made under (recorded on first use; another one raises
        ``ledger_schema.IdKeyMismatch``); returns how many rows keep plain digests from before schema 3."""
        with self._immediate() as db:
            return _bind_id_key(db, key_id, self.where)

    def _immediate(self) -> AbstractContextManager[Engine]:
        """A serialised write transaction (SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's advisory write lock)."""
        return self._db.write()

    @contextmanager
    def transaction(self) -> Iterator[LedgerTransaction]:
        """All writes of one decision, or none of them: the writes are issued when the block ends, then committed."""
        with self._immediate() as db:
            tx = LedgerTransaction(db)
            yield tx
            tx.flush()

    # -- ownership across hosts (issue 24) ------------------------------------------------------------
    def take_ownership(self, model: str, owner: str) -> int:
        """Take ``model`` on a rebalance: its epoch +1, in one serialised transaction; the daemon's fencing token."""
        return _ownership.take(self._db, model, owner)

    def ownership_epoch(self, model: str) -> int | None:
        """The model's ownership epoch now (None: never taken); what the check before ``LATEST`` moves compares."""
        return _ownership.current(self._db, model)

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
                        f"effect='accepted' AND request_id IN ({', '.join('?' * len(chunk))}) "
                        f"ORDER BY {self._db.delivery_order}", chunk):
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

    def begin_commit(self, round_id: str, parent: int, drafts: Sequence[Mapping[str, Any]], *,
                     fence: tuple[str, int | None] | None = None) -> None:
        """Record the intent before the registry write, so a crash in between can be resolved.

        ``fence`` (model, epoch): refuse with ``ownership.StaleOwner`` (nothing written) unless the epoch is still
        the model's, so a stale owner never turns a round its successor already resolved into ``committing``."""
        with self._immediate() as db:
            if fence is not None:
                _ownership.check(db, *fence)
            db.execute("UPDATE rounds SET state='committing', parent=?, drafts=? WHERE round_id=?",
                       (parent, json.dumps(list(drafts)), round_id))

    def rounds_in_state(self, state: str, owner: str | None = None, *, model: str | None = None
                        ) -> list[dict[str, Any]]:
        """Rounds in ``state``: of one daemon (``owner``), or of one model whoever ran them (a takeover)."""
        sql, args = "SELECT round_id, model, parent, request_ids, drafts, owner FROM rounds WHERE state=?", [state]
        if owner is not None:
            sql, args = sql + " AND owner=?", [*args, owner]
        if model is not None:
            sql, args = sql + " AND model=?", [*args, model]
        with self._lock:
            cur = self._db.execute(sql + " ORDER BY round_id", args)
            return [{"round_id": r[0], "model": r[1], "parent": r[2], "request_ids": json.loads(r[3]),
                     "drafts": json.loads(r[4]) if r[4] else [], "owner": r[5]} for r in cur.fetchall()]

    def abandon_if_running(self, round_id: str, reason: str) -> bool:
        """End a round ``abandoned`` only while it is still ``running`` (a stale owner's own round that nobody
        resolved yet); a round its successor already resolved keeps that outcome."""
        with self._immediate() as db:
            cur = db.execute("UPDATE rounds SET state='abandoned', reason=?, finished_at=?, drafts=NULL "
                             "WHERE round_id=? AND state='running'", (reason, time.time(), round_id))
            return cur.rowcount == 1

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
                "UNION ALL SELECT MAX(version) FROM rebases WHERE model=? AND state='committed') AS t",
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

        Returns (rebase id, whether it is new). Written by ``unlearnd rebase`` (any process: the write lock serialises
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

