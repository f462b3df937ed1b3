"""The daemon's parts without a broker: configuration, the ledger and its audit chain, receipts."""

from __future__ import annotations

import json
import os

import pytest

from daemon.pipeline.config import ConfigError, load_config, parse_probe
from daemon.pipeline.config_docs import example_toml, reference_rows
from daemon.pipeline.ledger import GENESIS_HASH, Ledger, LedgerError, chain_hash
from daemon.pipeline.receipts import AppliedReceipt, DuplicateReceipt, RejectedReceipt, instance_outcomes


# -- configuration -------------------------------------------------------------------------------------
def test_the_example_config_is_complete_and_valid(tmp_path):
    path = tmp_path / "u.toml"
    path.write_text(example_toml())
    config = load_config(path, env={})
    assert config.kafka.bootstrap == "127.0.0.1:19092" and config.models[0].name == "mnist-cnn"
    keys = {r["key"] for r in reference_rows()}
    text = example_toml()
    secrets = {"kafka.ssl_password", "kafka.sasl_password"}    # refused in a file: present, commented out
    for key in keys:   # every setting appears in the example, with its env override named
        name = key.split(".")[-1]
        assert (f"\n# {name} = " if key in secrets else f"\n{name} = ") in text, key
    assert len({r["env"] for r in reference_rows()}) == len(keys)


def test_environment_overrides_win_and_are_typed(tmp_path):
    config = load_config(None, env={"UNLEARND_KAFKA_BOOTSTRAP": "broker:9092", "UNLEARND_STATE_DIR": "/s",
                                    "UNLEARND_REGISTRY_DIR": "/r", "UNLEARND_ROUNDS_MAX_WAIT_S": "3.5",
                                    "UNLEARND_KAFKA_CREATE_TOPICS": "false",
                                    "UNLEARND_SERVING_NOTIFY_URLS": "http://a/x, http://b/y",
                                    "UNLEARND_MODELS_0_PROBE": "mnist-test:0-9"})
    assert config.kafka.bootstrap == "broker:9092" and config.state.dir == "/s" and config.registry.dir == "/r"
    assert config.rounds.max_wait_s == 3.5 and config.kafka.create_topics is False
    assert config.serving.notify_urls == ["http://a/x", "http://b/y"]
    assert config.models[0].probe == "mnist-test:0-9"


@pytest.mark.parametrize(("text", "env", "setting"), [
    ("[rounds]\nmax_wait_s = 'soon'\n", {}, "rounds.max_wait_s"),
    ("[rounds]\nmax_instances = 0\n", {}, "rounds.max_instances"),
    ("[rounds]\nmethod = 'magic'\n", {}, "rounds.method"),
    ("", {"UNLEARND_ROUNDS_CPU_POLICY": "realtime"}, "rounds.cpu_policy (from UNLEARND_ROUNDS_CPU_POLICY)"),
    ("[kafka]\nbootstrapp = 'x'\n", {}, "kafka.bootstrapp"),
    ("[nonsense]\n", {}, "nonsense"),
    ("[[models]]\nname = 'a b'\n", {}, "models[0].name"),
    ("[[models]]\nname = 'm'\nprobe = 'mnist-test:9-1'\n", {}, "models[0].probe"),
    ("[[models]]\nname = 'm'\n[[models]]\nname = 'm'\n", {}, "models[1].name"),
    ("[[models]]\nname = 'm'\ndataset = 'cifar10'\n", {}, "models[0].data_root"),
    ("[kafka]\nheartbeat_interval_ms = 5000\n", {}, "kafka.heartbeat_interval_ms"),
    ("", {"UNLEARND_METRICS_PORT": "eighty"}, "metrics.port (from UNLEARND_METRICS_PORT)"),
    ("", {"UNLEARND_KAFKA_CREATE_TOPICS": "maybe"}, "kafka.create_topics (from UNLEARND_KAFKA_CREATE_TOPICS)"),
    ("this is = not = toml", {}, "--config"),
])
def test_bad_configuration_is_rejected_naming_the_setting(tmp_path, text, env, setting):
    path = tmp_path / "u.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, env=env)
    assert exc.value.setting == setting


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize("policy", ["normal", "idle"])
def test_rounds_run_on_a_thread_with_the_configured_cpu_policy_and_torch_workers_inherit_it(policy):
    import threading

    import torch

    from daemon.cpu_policy import thread_policy
    from daemon.pipeline.assembly import round_executor

    config = load_config(None, env={"UNLEARND_ROUNDS_CPU_POLICY": policy, "UNLEARND_METRICS_PORT": "0"})
    executor = round_executor(config.rounds.cpu_policy)

    def work() -> tuple[str | None, int]:
        x = torch.randn(256, 256)
        for _ in range(5):
            x = (x @ x).tanh()             # a parallel op: torch starts its workers from this thread
        return thread_policy(), threading.get_native_id()

    try:
        got, tid = executor.submit(work).result()
    finally:
        executor.shutdown()
    assert got == policy
    tasks = [int(t) for t in os.listdir(f"/proc/{os.getpid()}/task")]
    idle = [t for t in tasks if os.sched_getscheduler(t) == os.SCHED_IDLE]
    assert (tid in idle) == (policy == "idle")
    assert threading.get_native_id() not in idle       # the daemon's own thread keeps its policy


def test_probe_spec():
    assert parse_probe("mnist-test:0-999") == ("mnist-test", 0, 1000)
    with pytest.raises(ValueError):
        parse_probe("mnist-test")


# -- ledger ----------------------------------------------------------------------------------------------
def _receipt(rid: str, status: str = "rejected") -> dict:
    return RejectedReceipt(request_id=rid, model="m", kind="forget", reason="bad_type", detail="x",
                           received_at=0.0).to_dict() | {"status": status}


def _tamper(ledger_db, *statements: str) -> None:
    """Statements run around the ledger, as someone with write access to the database could (SQLite's spelling
    of a body edit is adapted: PostgreSQL keeps the body as bytea)."""
    raw = ledger_db.raw()
    try:
        for sql in statements:
            if ledger_db.engine == "postgresql":
                sql = sql.replace("DROP TRIGGER audit_no_update", "DROP TRIGGER audit_no_update ON audit")
                sql = sql.replace("DROP TRIGGER audit_no_delete", "DROP TRIGGER audit_no_delete ON audit")
                sql = sql.replace("replace(body, 'bad_type', 'ok')",
                                  "convert_to(replace(convert_from(body, 'UTF8'), 'bad_type', 'ok'), 'UTF8')")
            raw.execute(sql)
        raw.commit()
    finally:
        raw.close()


def test_audit_chain_links_every_receipt_and_verify_finds_the_first_broken_entry(ledger_db):
    ledger = Ledger(ledger_db.target())
    with ledger.transaction() as tx:
        out = [tx.append_receipt(_receipt(f"r{i}"), "receipts") for i in range(5)]
    assert out[0]["audit"]["prev_hash"] == GENESIS_HASH
    for a, b in zip(out, out[1:]):
        assert b["audit"]["prev_hash"] == a["audit"]["hash"] and b["audit"]["entry"] == a["audit"]["entry"] + 1
    assert ledger.verify_audit() == (5, None)
    # the published receipt is exactly what the chain hashed (plus its audit block)
    body = json.dumps({k: v for k, v in out[2].items() if k != "audit"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()
    assert chain_hash(out[2]["audit"]["prev_hash"], body) == out[2]["audit"]["hash"]
    # append-only: the database itself refuses changes, through the ledger's connection or around it
    for sql in ("UPDATE audit SET status='applied' WHERE entry=3", "DELETE FROM audit WHERE entry=3"):
        with pytest.raises(ledger_db.errors, match="append-only"):
            with ledger.transaction() as tx:
                tx.db.execute(sql)
        with pytest.raises(ledger_db.errors, match="append-only"):
            _tamper(ledger_db, sql)
    if ledger_db.engine == "postgresql":        # TRUNCATE skips row triggers: a statement trigger refuses it
        with pytest.raises(ledger_db.errors, match="append-only"):
            _tamper(ledger_db, "TRUNCATE audit")
    assert ledger.verify_audit() == (5, None)
    ledger.close()
    # someone with write access drops the guard and edits entry 3: verification names it
    _tamper(ledger_db, "DROP TRIGGER audit_no_update", "UPDATE audit SET body = replace(body, 'bad_type', 'ok') "
                                                        "WHERE entry=3")
    count, problem = Ledger(ledger_db.target()).verify_audit()
    assert count == 2 and problem is not None and problem.entry == 3


def test_deleted_audit_entry_is_found(ledger_db):
    ledger = Ledger(ledger_db.target())
    with ledger.transaction() as tx:
        for i in range(4):
            tx.append_receipt(_receipt(f"r{i}"), "receipts")
    ledger.close()
    _tamper(ledger_db, "DROP TRIGGER audit_no_delete", "DELETE FROM audit WHERE entry=2")
    count, problem = Ledger(ledger_db.target()).verify_audit()
    assert count == 1 and problem.entry == 2 and "missing" in problem.reason


def test_outbox_rows_leave_only_when_acknowledged_and_a_failed_transaction_leaves_nothing(ledger_db):
    ledger = Ledger(ledger_db.target())
    with ledger.transaction() as tx:
        tx.enqueue("dlq", b"k", b"\xff raw", [("error.reason", b"not_json")])
        tx.append_receipt(_receipt("a"), "receipts")
    with pytest.raises(RuntimeError):
        with ledger.transaction() as tx:
            tx.append_receipt(_receipt("b"), "receipts")
            raise RuntimeError("crash mid-decision")
    rows = ledger.outbox()
    assert [r.topic for r in rows] == ["dlq", "receipts"]
    assert rows[0].value == b"\xff raw" and rows[0].headers == [("error.reason", b"not_json")]
    assert ledger.verify_audit()[0] == 1
    ledger.acknowledge([rows[0].seq])
    assert [r.topic for r in ledger.outbox()] == ["receipts"]


def test_deliveries_requests_and_rounds_survive_reopening(ledger_db):
    ledger = Ledger(ledger_db.target())
    with ledger.transaction() as tx:
        tx.accept("req-1", "m", "forget", 2, 100.0)
        tx.record_delivery("t", 0, 7, "fp", "req-1", "accepted")
    rid = ledger.allocate_round("m", "d1", ["req-1"])
    ledger.begin_commit(rid, 1, [{"request_id": "req-1"}])
    ledger.close()
    ledger = Ledger(ledger_db.target())
    seen = ledger.delivery("t", 0, 7)
    assert seen.fingerprint == "fp" and seen.request_status == "accepted"
    assert ledger.rounds_in_state("committing", "d1")[0]["drafts"] == [{"request_id": "req-1"}]
    assert ledger.rounds_in_state("committing", "d2") == []       # recovery touches only its own rounds
    with ledger.transaction() as tx:
        tx.end_round(rid, "committed", version=2)
        tx.finish("req-1", "applied", round_id=rid, model_version=2)
    assert ledger.request("req-1")["status"] == "applied" and ledger.last_committed_version("m") == 2
    assert ledger.rounds_in_state("committing", "d1") == []


def _ledger_state(ledger: Ledger) -> dict:
    db = ledger._db
    return {
        "requests": db.execute("SELECT request_id, model, kind, status, reason, round_id, model_version, instances, "
                               "received_at FROM requests ORDER BY request_id").fetchall(),
        "deliveries": db.execute('SELECT * FROM deliveries ORDER BY topic, partition, "offset"').fetchall(),
        "audit": db.execute("SELECT entry, request_id, status, body, prev_hash, hash FROM audit ORDER BY entry"
                            ).fetchall(),
        "outbox": db.execute("SELECT seq, topic, key, value, headers FROM outbox ORDER BY seq").fetchall(),
    }


def test_an_intake_batch_leaves_the_ledger_as_the_same_statements_one_by_one_would(ledger_db):
    """A LedgerTransaction buffers an intake poll's writes (executemany at flush) and answers its own reads from
    memory: the ledger must end up byte for byte as with each statement issued at once and read back from the file."""
    def decide(ledger: Ledger, batched: bool) -> list:
        with ledger.transaction() as tx:     # history: an applied request, an earlier receipt
            tx.finish("old", "applied", model="m", kind="forget", round_id="r-000001", model_version=2,
                      received_at=50.0)
            tx.append_receipt(_receipt("old", "applied"), "receipts")
            tx.record_delivery("t", 0, 3, "fp-3", "old", "accepted")
        seen = []
        with ledger.transaction() as tx:
            if batched:
                tx.load([("t", 0, o) for o in range(3, 9)], ["old", "new", "bad"])
            delivery = tx.delivery if batched else ledger.delivery
            request = tx.request if batched else ledger.request

            def write(verb: str, *a, **k) -> None:     # one by one: issued at once, read back from the file
                getattr(tx, verb)(*a, **k)
                if not batched:
                    tx.flush()

            seen.append(delivery("t", 0, 3))
            seen.append(delivery("t", 0, 4))
            for off, rid in ((4, "old"), (5, "bad"), (6, "bad"), (7, "new"), (8, "new")):
                existing = request(rid)
                seen.append(existing and {k: existing[k] for k in ("status", "round_id", "model_version")})
                if rid == "bad" and existing is None:     # a rejection the first time
                    write("enqueue", "dlq", b"m", b"{", [("error.reason", b"bad_kind")])
                    write("finish", rid, "rejected", model="m", kind=None, reason="bad_kind", received_at=100.0)
                    receipt, effect = _receipt(rid), "rejected"
                elif rid == "new" and existing is None:   # accepted the first time
                    write("accept", rid, "m", "forget", 2, 100.0)
                    write("record_delivery", "t", 0, off, f"fp-{off}", rid, "accepted")
                    continue
                else:
                    receipt, effect = DuplicateReceipt.of(request_id=rid, model="m", kind="forget", original=existing,
                                                          received_at=100.0).to_dict(), "duplicate"
                write("append_receipt", {**receipt, "daemon": "d1"}, "receipts")
                write("record_delivery", "t", 0, off, f"fp-{off}", rid, effect)
        return seen

    one, many = Ledger(ledger_db.target("one")), Ledger(ledger_db.target("many"))
    seen_one, seen_many = decide(one, batched=False), decide(many, batched=True)
    assert seen_one == seen_many
    assert seen_many[0].fingerprint == "fp-3" and seen_many[0].request_status == "applied" and seen_many[1] is None
    a, b = _ledger_state(one), _ledger_state(many)
    assert a["requests"] == b["requests"] and a["deliveries"] == b["deliveries"]
    for x, y in zip(a["audit"], b["audit"], strict=True):   # the bodies' received_at are the same; created_at differ
        assert x == y
    assert [r[:3] for r in a["outbox"]] == [r[:3] for r in b["outbox"]]
    assert [r[3:] for r in a["outbox"]] == [r[3:] for r in b["outbox"]]
    assert len(b["audit"]) == 5 and many.verify_audit() == (5, None)
    statuses = [json.loads(r[3])["status"] for r in b["outbox"] if r[1] == "receipts"]
    assert statuses == ["applied", "duplicate", "rejected", "duplicate", "duplicate"]
    # the published receipt is the canonical JSON of the receipt with its audit block
    last = json.loads(b["outbox"][-1][3])
    assert b["outbox"][-1][3] == json.dumps(last, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path):
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LedgerError):
        Ledger(path)


# -- receipts --------------------------------------------------------------------------------------------
def test_applied_receipt_completes_the_draft_and_holds_no_clear_id():
    draft = AppliedReceipt(
        request_id="r", model="m", kind="forget", round_id="r-000001", previous_version=3,
        method={"name": "adv_imp"}, instances=instance_outcomes(["a" * 64], [7], [7], [2], None),
        forget_accuracy=0.0, probe_accuracy_before=0.99, probe_accuracy_after=float("nan"),
        received_at=1000.0, forget_class=None)
    full = draft.completed(version=4, sha256="b" * 64, applied_at=1012.5).to_dict()
    assert full["model_version"] == 4 and full["previous_version"] == 3 and full["model_sha256"] == "b" * 64
    assert full["timings"]["time_to_forget_s"] == 12.5 and "received_ts" not in full
    assert full["metrics"]["probe_accuracy_after"] is None            # NaN is not JSON
    assert full["instances"] == [{"id_sha256": "a" * 64, "label": 7, "prediction_before": 7,
                                  "prediction_after": 2}]
    json.dumps(full, allow_nan=False)


def test_the_quickstart_daemon_yields_the_cpu_to_the_server_beside_it(tmp_path):
    from daemon.pipeline.quickstart import _config

    config = load_config(_config(tmp_path, 19999, 8001), env={})
    assert config.rounds.cpu_policy == "idle"
    assert config.serving.notify_urls == ["http://127.0.0.1:8001/v2/repository/models/{name}/load"]
