"""The ledger on both engines (issue 24): versioned schema opened idempotently, writers serialised across two
"daemons" sharing one database, and a bad or unreachable ``state.url`` refused with the setting named (exit 2)."""

from __future__ import annotations

import threading
import time

import pytest

from daemon.pipeline.config import ConfigError, load_config
from daemon.pipeline.ledger import Ledger, LedgerError
from daemon.pipeline.ledger_schema import SCHEMA_VERSION
from tests.pipeline_harness import free_port


def _triggers(ledger_db) -> list[str]:
    raw = ledger_db.raw()
    try:
        if ledger_db.engine == "sqlite":
            rows = raw.execute("SELECT name FROM sqlite_master WHERE type='trigger' ORDER BY name").fetchall()
        else:
            rows = raw.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'audit'::regclass AND NOT tgisinternal "
                               "ORDER BY tgname").fetchall()
        return [r[0] for r in rows]
    finally:
        raw.close()


def _meta(ledger_db) -> list[tuple[str, str]]:
    raw = ledger_db.raw()
    try:
        return [tuple(r) for r in raw.execute("SELECT key, value FROM meta ORDER BY key").fetchall()]
    finally:
        raw.close()


def test_opening_a_ledger_again_and_again_migrates_nothing_twice_and_keeps_its_rows(ledger_db):
    """The schema (tables, indexes, the audit guard) is created at start-up by statements that are idempotent: a
    second, third open of the same database changes nothing, keeps every row and one schema_version."""
    ledger = Ledger(ledger_db.target())
    ledger.bind_id_key("k1")
    with ledger.transaction() as tx:
        tx.accept("r1", "m", "forget", 1, 10.0)
        tx.append_receipt({"request_id": "r1", "status": "accepted"}, "receipts")
    ledger.close()
    meta, triggers = _meta(ledger_db), _triggers(ledger_db)
    assert ("schema_version", str(SCHEMA_VERSION)) in meta and ("id_key", "k1") in meta
    expected = ["audit_no_delete", "audit_no_update"] + (["audit_no_truncate"] if ledger_db.engine != "sqlite" else [])
    assert sorted(triggers) == sorted(expected)
    for _ in range(2):
        again = Ledger(ledger_db.target())
        assert again.request("r1")["status"] == "accepted" and again.verify_audit() == (1, None)
        assert again.bind_id_key("k1") == 0
        again.close()
    assert _meta(ledger_db) == meta and _triggers(ledger_db) == triggers


def test_a_newer_schema_is_refused_on_both_engines(ledger_db):
    Ledger(ledger_db.target()).close()
    raw = ledger_db.raw()
    raw.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    raw.commit()
    raw.close()
    with pytest.raises(LedgerError, match="ledger schema 99, this unlearnd reads 3"):
        Ledger(ledger_db.target())


def test_two_daemons_writing_one_ledger_at_once_keep_one_audit_chain_and_distinct_round_ids(ledger_db):
    """Two connections (two daemons, or a daemon and ``unlearnd rebase``) write concurrently: every write
    transaction is serialised (SQLite's write lock, PostgreSQL's advisory lock), so the hash chain has one tail,
    no entry number is used twice, and the counted round ids are unique."""
    target = ledger_db.target()
    if ledger_db.engine == "postgresql":    # a server defaulting to SERIALIZABLE must not change the write lock
        raw = ledger_db.raw()
        raw.execute(f"ALTER DATABASE {target.rsplit('/', 1)[1]} SET default_transaction_isolation = 'serializable'")
        raw.commit()
        raw.close()
    ledgers = [Ledger(target), Ledger(target)]
    rounds: list[str] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        ledger = ledgers[n]
        try:
            for i in range(25):
                with ledger.transaction() as tx:
                    tx.accept(f"d{n}-{i}", "m", "forget", 1, float(i))
                    tx.record_delivery("requests", n, i, f"fp{n}-{i}", f"d{n}-{i}", "accepted")
                    tx.append_receipt({"request_id": f"d{n}-{i}", "status": "accepted"}, "receipts")
                rounds.append(ledger.allocate_round("m", f"daemon-{n}", [f"d{n}-{i}"]))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert ledgers[0].verify_audit() == (50, None)
    assert len(rounds) == len(set(rounds)) == 50
    assert len(ledgers[1].outbox(limit=1000)) == 50
    for ledger in ledgers:
        ledger.close()


def test_the_newest_accepting_delivery_of_a_request_is_the_last_recorded_even_at_a_reused_offset(ledger_db):
    """Which message accepted a request (the stranded watch's evidence) is the row recorded last, not the highest
    offset: SQLite orders by rowid (a replaced row gets a new one), PostgreSQL by a sequence the upsert bumps."""
    ledger = Ledger(ledger_db.target())
    for offset, fp in ((7, "a"), (3, "b"), (7, "c")):      # offset 7 again: a broker that lost its log
        with ledger.transaction() as tx:
            tx.record_delivery("req", 0, offset, fp, "r1", "accepted")
        newest = ledger.accepted_deliveries(["r1"])["r1"]
        assert newest == ("req", 0, offset, fp)
    assert ledger.delivery("req", 0, 7).fingerprint == "c"
    ledger.close()


# -- state.url: validated, reached, named -----------------------------------------------------------------
@pytest.mark.parametrize("url, message", [
    ("mysql://u@h:3306/db", "must be postgresql://"),
    ("postgresql://u@127.0.0.1:notaport/db", "port is not a number"),
    ("postgresql://u@127.0.0.1:5432/", "database name"),
    ("postgresql://u:hunter2@127.0.0.1:5432/db", "holds a password"),
])
def test_a_malformed_state_url_is_refused_naming_the_setting(url, message):
    with pytest.raises(ConfigError, match=rf"state\.url.*{message}") as info:
        load_config(None, env={"UNLEARND_STATE_URL": url})
    assert "hunter2" not in str(info.value)


def test_an_unreachable_database_is_a_clear_error_naming_state_url():
    url = f"postgresql://unlearnd@127.0.0.1:{free_port()}/ledger"       # nothing listens there
    with pytest.raises(LedgerError, match=r"state\.url: cannot open the PostgreSQL ledger at postgresql://"):
        Ledger(url)


def _config_file(tmp_path):
    path = tmp_path / "u.toml"
    path.write_text(f'[state]\ndir = "{tmp_path / "state"}"\n[registry]\ndir = "{tmp_path / "reg"}"\n'
                    f'[[models]]\nname = "mnist-cnn"\ndataset = "mnist"\n')
    return path


def test_config_check_and_run_exit_2_naming_state_url_when_the_database_cannot_be_reached(tmp_path, monkeypatch,
                                                                                          capsys):
    from daemon.cli import main

    monkeypatch.setenv("UNLEARND_STATE_URL", f"postgresql://unlearnd@127.0.0.1:{free_port()}/ledger")
    monkeypatch.setenv("UNLEARND_STATE_WAIT_S", "1.5")      # only `run` waits for a server that may be restarting
    for argv in (["config", "check"], ["run"], ["audit", "verify"]):
        start = time.monotonic()
        assert main([*argv, "--config", str(_config_file(tmp_path))]) == 2, argv
        took = time.monotonic() - start
        err = capsys.readouterr().err
        assert "state.url" in err and "cannot open the PostgreSQL ledger" in err, (argv, err)
        assert ("waited 1.5 s, state.wait_s" in err) == (argv == ["run"]), (argv, err)
        assert (took >= 1.5) == (argv == ["run"]), (argv, took)
    assert not (tmp_path / "state" / "ledger.sqlite").exists()


@pytest.mark.postgres
def test_config_check_reports_a_reachable_postgresql_ledger(tmp_path, monkeypatch, capsys, postgres):
    from daemon.cli import main

    url = postgres.new_database()
    monkeypatch.setenv("UNLEARND_STATE_URL", url)
    assert main(["config", "check", "--config", str(_config_file(tmp_path))]) == 0
    assert f"ledger PostgreSQL {url}" in capsys.readouterr().out
    postgres.drop_database(url)


@pytest.mark.postgres
def test_a_postgresql_restart_is_ridden_out_and_an_outage_is_a_clear_error_that_loses_nothing(tmp_path, monkeypatch):
    """A managed database restarts or fails over: the ledger connects again at its next call, a statement sent
    into the dead connection outside a transaction is sent again, and while the server is down every call fails
    with LedgerUnavailable naming state.url. A transaction cut in the middle leaves nothing behind."""
    from daemon.pipeline.ledger import LedgerUnavailable
    from tests.pg_harness import PostgresServer

    server = PostgresServer().start()
    try:
        ledger = Ledger(server.new_database())
        first = ledger.allocate_round("m", "d1", ["a"])
        server.restart()
        assert ledger.round_state(first) == "running"                 # a read on the dead connection: sent again
        server.restart()
        second = ledger.allocate_round("m", "d1", ["b"])              # a write transaction: begun again
        assert ledger.round_state(second) == "running" and second != first

        with pytest.raises(LedgerUnavailable, match=r"state\.url: lost the PostgreSQL ledger at postgresql://"):
            with ledger._immediate() as db:                          # cut between two statements of one transaction
                db.execute("INSERT INTO meta VALUES ('cut', 'half')")
                server.restart()
                db.execute("INSERT INTO meta VALUES ('cut2', 'half')")
        assert ledger._db.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'cut%'").fetchone()[0] == 0

        server._shutdown()
        with pytest.raises(LedgerUnavailable, match=r"state\.url: cannot open the PostgreSQL ledger"):
            ledger.round_state(first)
        with pytest.raises(LedgerUnavailable, match=r"state\.url"):
            ledger.allocate_round("m", "d1", ["c"])
        # the daemon's start waits (state.wait_s) for a server that does not answer yet, and no longer
        from daemon.pipeline.config_checks import check_state_database

        monkeypatch.setenv("UNLEARND_STATE_URL", ledger.where.replace("***", ""))
        config = load_config(_config_file(tmp_path))
        with pytest.raises(ConfigError, match=r"state\.url.*waited 0\.5 s"):
            check_state_database(config, wait_s=0.5)
        relaunch = threading.Timer(1.5, server._launch)
        relaunch.start()
        start = time.monotonic()
        check_state_database(config, wait_s=60)
        assert 1.5 <= time.monotonic() - start < 30
        relaunch.join()
        with ledger.transaction() as tx:
            tx.end_round(first, "abandoned", reason="the test")
        assert ledger.round_state(first) == "abandoned"
        count, problem = ledger.verify_audit()
        assert problem is None
        ledger.close()
    finally:
        server.stop()
