"""Ownership across hosts (issue 24, part 3): the per-model epoch in the shared ledger is the fencing token; a
stale owner's round commit and its publish are refused, on both engines."""

from __future__ import annotations

import threading

import pytest

from daemon.pipeline.ledger import Ledger
from daemon.pipeline.ownership import StaleOwner, check_publish


def test_every_takeover_gets_a_higher_epoch_and_two_daemons_never_share_one(ledger_db):
    """Two "hosts" (two connections to one database) taking the same models at once: every take gets its own
    epoch, they are consecutive, and the last taker is the recorded owner."""
    a, b = Ledger(ledger_db.target()), Ledger(ledger_db.target())
    try:
        assert a.ownership_epoch("m1") is None
        got: dict[str, list[int]] = {"a": [], "b": []}

        def taker(name: str, ledger: Ledger) -> None:
            for _ in range(10):
                got[name].append(ledger.take_ownership("m1", name))

        threads = [threading.Thread(target=taker, args=(n, led)) for n, led in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got["a"] + got["b"]) == list(range(1, 21))
        assert a.ownership_epoch("m1") == b.ownership_epoch("m1") == 20
        assert b.take_ownership("m2", "b") == 1          # epochs are per model
    finally:
        a.close()
        b.close()


def test_a_stale_owners_round_commit_is_refused_and_writes_nothing(ledger_db):
    """A takes m, B takes it over; A's commit under its old epoch raises StaleOwner and leaves the request as it
    was (accepted, for the new owner), while B's commit under the current epoch goes through."""
    a, b = Ledger(ledger_db.target()), Ledger(ledger_db.target())
    try:
        with a.transaction() as tx:
            tx.accept("r1", "m", "forget", 1, 10.0)
        old = a.take_ownership("m", "daemon-a")
        new = b.take_ownership("m", "daemon-b")
        assert new == old + 1
        with pytest.raises(StaleOwner, match="stale owner"):
            with a.transaction() as tx:
                tx.finish("r1", "applied", model="m", kind="forget")
                tx.append_receipt({"request_id": "r1", "status": "applied"}, "receipts")
                tx.fence("m", old)
        assert a.request("r1")["status"] == "accepted" and a.verify_audit() == (0, None)
        with pytest.raises(StaleOwner):                # no token at all: refused once a daemon took the model
            with a.transaction() as tx:
                tx.fence("m", None)
        with b.transaction() as tx:
            tx.fence("m", new)
            tx.finish("r1", "applied", model="m", kind="forget")
            tx.append_receipt({"request_id": "r1", "status": "applied"}, "receipts")
        assert b.request("r1")["status"] == "applied" and b.verify_audit() == (1, None)
    finally:
        a.close()
        b.close()


def test_a_single_daemon_without_ownership_commits_as_before(ledger_db):
    """One host, no takeover ever: the model has no epoch and a commit without a token is accepted."""
    ledger = Ledger(ledger_db.target())
    try:
        with ledger.transaction() as tx:
            tx.fence("m", None)
            tx.accept("r1", "m", "forget", 1, 10.0)
        assert ledger.request("r1")["status"] == "accepted"
    finally:
        ledger.close()


def test_a_stale_owners_publish_is_refused_before_latest_moves(ledger_db):
    """The registry-side check (shared volume or S3): refused when LATEST's manifest carries a newer owner_epoch
    or the ledger's epoch moved on; accepted for the current owner over an older or pre-issue-24 manifest."""
    a, b = Ledger(ledger_db.target()), Ledger(ledger_db.target())
    try:
        old = a.take_ownership("m", "daemon-a")
        new = b.take_ownership("m", "daemon-b")
        with pytest.raises(StaleOwner, match="LATEST"):
            check_publish("m", old, {"version": 7, "owner_epoch": new}, a.ownership_epoch("m"))
        with pytest.raises(StaleOwner, match="the ledger"):       # B has not published yet: the ledger tells
            check_publish("m", old, {"version": 6, "owner_epoch": old}, a.ownership_epoch("m"))
        check_publish("m", new, {"version": 6, "owner_epoch": old}, b.ownership_epoch("m"))
        check_publish("m", new, {"version": 6}, b.ownership_epoch("m"))
        check_publish("m", new, None, b.ownership_epoch("m"))
    finally:
        a.close()
        b.close()


def test_a_ledger_without_the_ownership_table_gains_it_on_open(ledger_db):
    """The migration is idempotent and additive: a database from before issue 24 (no ownership table) gets it on
    the next open, with every other row kept."""
    ledger = Ledger(ledger_db.target())
    with ledger.transaction() as tx:
        tx.accept("r1", "m", "forget", 1, 10.0)
    ledger.close()
    raw = ledger_db.raw()
    try:
        raw.execute("DROP TABLE ownership")
        raw.commit()
    finally:
        raw.close()
    for _ in range(2):
        again = Ledger(ledger_db.target())
        assert again.request("r1")["status"] == "accepted"
        assert again.take_ownership("m", "d") >= 1
        again.close()
