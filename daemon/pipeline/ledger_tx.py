"""The ledger's one write API: the buffered writes of one decision, issued together inside its transaction.

Split from :mod:`daemon.pipeline.ledger` (which opens the database and answers the reads): the statements here
are written once, in SQLite's spelling, and run on either engine through :class:`daemon.pipeline.ledger_sql.Engine`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.pipeline.canonical import canonical_json
from daemon.pipeline.ledger_sql import Engine
from daemon.pipeline.ownership import check as _ownership_check

__all__ = ["FINAL_STATUSES", "GENESIS_HASH", "Delivery", "ForgottenContent", "LedgerTransaction", "chain_hash"]

GENESIS_HASH = "0" * 64
# "stranded": accepted, then its round was lost and the broker could no longer redeliver its message
# (:mod:`daemon.pipeline.stranded`); its receipt is ``failed`` and a resubmission of its id is accepted anew
FINAL_STATUSES = ("applied", "rejected", "failed", "stranded")


_SQL_ACCEPT = ("INSERT INTO requests (request_id, model, kind, status, instances, received_at) "
               "VALUES (?, ?, ?, 'accepted', ?, ?) ON CONFLICT(request_id) DO UPDATE SET "
               "received_at=CASE WHEN excluded.received_at < requests.received_at THEN excluded.received_at "
               "ELSE requests.received_at END, "
               # a stranded request resubmitted waits again (its deletion clock runs from the first receipt)
               "status='accepted', reason=NULL, round_id=NULL, model_version=NULL, finished_at=NULL, "
               "instances=excluded.instances, "
               "attempts=requests.attempts + CASE WHEN requests.status='stranded' THEN 1 ELSE 0 END "
               "WHERE requests.status IN ('accepted', 'stranded')")
_SQL_FINISH = ("INSERT INTO requests (request_id, model, kind, status, reason, round_id, model_version, "
               "received_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(request_id) DO UPDATE SET "
               "status=excluded.status, reason=excluded.reason, round_id=excluded.round_id, "
               "model_version=excluded.model_version, finished_at=excluded.finished_at")
_SQL_END_ROUND = "UPDATE rounds SET state=?, version=?, reason=?, finished_at=?, drafts=NULL WHERE round_id=?"
_SQL_FORGOTTEN = "INSERT INTO forgotten VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
_SQL_FORGOTTEN_CONTENT = ("INSERT INTO forgotten_content (model, content_sha256, id_sha256, request_id, round_id, "
                          "kind, label, target, class) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SQL_END_REBASE = "UPDATE rebases SET state=?, version=?, reason=?, finished_at=?, drafts=NULL WHERE rebase_id=?"
_SQL_EXACT = "INSERT INTO exact VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
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

@dataclass(frozen=True)
class Delivery:
    """What a consumed message already did (found again after a redelivery)."""

    fingerprint: str
    request_id: str | None
    effect: str
    request_status: str | None



def chain_hash(prev_hash: str, body: bytes) -> str:
    """An entry's hash covers the previous entry's hash, so removing or changing any entry shows."""
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + body).hexdigest()

class LedgerTransaction:
    """The writes of one decision (an intake poll, a round's outcome), issued together inside its transaction.

    The one write API of the ledger: :meth:`Ledger.transaction` yields it and flushes it before committing.
    Reads come first and in bulk (:meth:`load`: one range query per partition for the deliveries, ``IN``
    lookups for the request ids); every write is then buffered and answered from memory when the same
    transaction reads it back (a request id that appears twice in one poll is a duplicate the second time);
    :meth:`flush` issues them with ``executemany`` in the order they were made, before the transaction
    commits. The audit chain is continued from the last entry read once, inside the transaction (which
    holds the engine's write lock, so no other writer can append in between). An intake poll decides hundreds of
    messages this way in one transaction, with a handful of statements.
    """

    def __init__(self, db: Engine) -> None:
        self.db = db
        self._deliveries: dict[tuple[str, int, int], Delivery] = {}
        self._requests: dict[str, dict[str, Any] | None] = {}
        self._row_ops: list[tuple[str, tuple[Any, ...]]] = []      # requests, rounds, forgotten: in order
        self._delivery_rows: list[tuple[Any, ...]] = []
        self._audit_rows: list[tuple[Any, ...]] = []
        self._outbox_rows: list[tuple[Any, ...]] = []
        last = db.execute(_SQL_LAST_AUDIT).fetchone()
        self._entry, self._prev = (0, GENESIS_HASH) if last is None else (last[0], last[1])

    def fence(self, model: str, epoch: int | None) -> None:
        """Issue 24: refuse this transaction (``ownership.StaleOwner``, nothing written) unless ``epoch`` is still
        the model's ownership epoch; checked under the write lock, so no takeover can slip in before the commit."""
        _ownership_check(self.db, model, epoch)

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
            db.executemany(db.delivery_upsert, self._delivery_rows)
        if self._audit_rows:
            db.executemany(_SQL_AUDIT, self._audit_rows)
        if self._outbox_rows:
            db.executemany(_SQL_OUTBOX, self._outbox_rows)
        self._row_ops, self._delivery_rows, self._audit_rows, self._outbox_rows = [], [], [], []
