"""The ledger's schema: its tables, indexes and the triggers that keep the audit trail append-only.

Written in SQLite's spelling; PostgreSQL's is derived from it (:func:`daemon.pipeline.ledger_sql.postgres_schema`).

Kept apart from :mod:`daemon.pipeline.ledger` (the operations on it) so the schema reads as one document;
``SCHEMA_VERSION`` is what a ledger file records, and a file of a version in ``_MIGRATABLE`` is brought up to it
on open by creating what it lacks (nothing is rewritten) and :func:`migrate`.

Schema 3 (issue 23): the digests in ``forgotten`` and ``forgotten_content`` (columns ``id_sha256`` and
``content_sha256``, names kept) are HMAC-SHA256 under the daemon's id key, written ``hmac-sha256:<key id>:<hex>``
(:mod:`daemon.keys`); a bare 64-hex digest is a plain SHA-256 written before schema 3. ``meta`` records the id
key's id (``id_key``, bound by :func:`bind_id_key` on the first open with a key: a ledger never mixes two keys)
and, for a migrated file, how many rows keep plain digests (``plain_digests``: they cannot be re-keyed, the
clear ids were never kept; a rebase still matches their content by hashing its source both ways).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.pipeline.ledger_sql import Engine

__all__ = ["MIGRATABLE", "SCHEMA", "SCHEMA_VERSION", "IdKeyMismatch", "bind_id_key", "migrate"]

SCHEMA_VERSION = 3
MIGRATABLE = {1, 2}        # schema 1 lacks forgotten_content, rebases and exact: created on open; 1 and 2: migrate()


_SET_META = "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value"


class IdKeyMismatch(ValueError):
    """The ledger's digests were made under another id key than the configured one."""


def migrate(db: Engine, from_version: int) -> None:
    """Bring a schema-1 or -2 file (its missing tables already created) up to schema 3: record how many of its
    rows keep plain SHA-256 digests, so the daemon can say so (its digests are not rewritten: they cannot be)."""
    if from_version not in MIGRATABLE:
        raise ValueError(f"no migration from ledger schema {from_version}")
    plain = db.execute("SELECT (SELECT COUNT(*) FROM forgotten WHERE id_sha256 NOT LIKE 'hmac-sha256:%') + "
                       "(SELECT COUNT(*) FROM forgotten_content WHERE content_sha256 NOT LIKE 'hmac-sha256:%')"
                       ).fetchone()[0]
    db.execute(_SET_META, ("plain_digests", str(int(plain))))
    db.execute(_SET_META, ("migrated_from", str(from_version)))


def bind_id_key(db: Engine, key_id: str, where: str) -> int:
    """Record ``key_id`` as the ledger's id key on first use; :class:`IdKeyMismatch` when another was recorded.
    Returns how many rows keep plain digests (from before schema 3)."""
    row = db.execute("SELECT value FROM meta WHERE key='id_key'").fetchone()
    if row is None:
        db.execute("INSERT INTO meta VALUES ('id_key', ?)", (key_id,))
    elif row[0] != key_id:
        raise IdKeyMismatch(f"{where}: its instance and content digests were made under id key {row[0]}, the "
                            f"configured id key is {key_id} (keys.id_key_file): configure the key this ledger "
                            f"was written with (a new key would make exact rebases miss forgotten instances)")
    plain = db.execute("SELECT value FROM meta WHERE key='plain_digests'").fetchone()
    return int(plain[0]) if plain is not None else 0

SCHEMA = """
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
    state      TEXT NOT NULL,               -- running | committing | committed | failed | split | aborted
                                            -- | abandoned | deferred (split: failed, its requests retried in
                                            -- halves; deferred: refused by the gate while a rebase ran, its
                                            -- requests wait for the rebase)
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
CREATE TABLE IF NOT EXISTS forgotten_content (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,   -- commit order: a rebase's snapshot is a seq
    model      TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,           -- daemon.data.content: the instance as the model saw it
    id_sha256  TEXT NOT NULL,
    request_id TEXT NOT NULL,
    round_id   TEXT NOT NULL,
    kind       TEXT NOT NULL,
    label      INTEGER NOT NULL,            -- the label the round used (what a re-application needs)
    target     INTEGER,                     -- relabel
    class      INTEGER                      -- forget_class
);
CREATE INDEX IF NOT EXISTS forgotten_content_model ON forgotten_content(model, seq);
CREATE INDEX IF NOT EXISTS forgotten_content_id ON forgotten_content(model, id_sha256, round_id);
CREATE TABLE IF NOT EXISTS rebases (
    rebase_id  TEXT PRIMARY KEY,            -- rb-000001
    model      TEXT NOT NULL,
    state      TEXT NOT NULL,               -- requested | running | committing | committed | failed
    trigger    TEXT NOT NULL,               -- on_demand | every_deletions | probe_margin | memory_fill
    owner      TEXT,
    attempts   INTEGER NOT NULL DEFAULT 0,
    base_version INTEGER,
    snapshot_seq INTEGER,                   -- forgotten_content rows up to this seq are left out of training
    forgotten  INTEGER,                     -- how many distinct forgotten instances that snapshot holds
    excluded   INTEGER,                     -- how many items of the training source it left out for them
    digest     TEXT,                        -- sha256 over their sorted content hashes
    covered_seq INTEGER,                    -- rows up to here are in the published version (re-applied after seq)
    drafts     TEXT,                        -- JSON: the exact receipts to emit on commit
    version    INTEGER,
    reason     TEXT,
    requested_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS exact (
    request_id TEXT PRIMARY KEY,            -- once per request: the first rebase that left all of it out
    rebase_id  TEXT NOT NULL,
    version    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT NOT NULL,
    key        BLOB,
    value      BLOB NOT NULL,
    headers    TEXT NOT NULL,               -- JSON list of [name, value-as-latin1]
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ownership (       -- issue 24: who owns a model across hosts, and the fencing token
    model      TEXT PRIMARY KEY,
    epoch      INTEGER NOT NULL,            -- +1 on every takeover; a commit or publish under a lower one is stale
    owner      TEXT NOT NULL,               -- the daemon instance that took it last
    taken_at   REAL NOT NULL
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
