"""Issue 23, item 6: the smaller cases, each with the outcome the contract promises.

Rejections whose request id is readable get a receipt even when the strict JSON reader refuses the message;
an instance forgotten before is recognised (not re-forgotten under today's prediction); ``config check`` and
the daemon's start refuse values the daemon would die on; world-writable folders are warned about; a stranded
request's id is accepted again (the ledger half of item 1).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from kafka import TopicPartition

from daemon.data.mnist import load_mnist
from daemon.data.sources import builtin_sources
from daemon.pipeline.batcher import Batcher
from daemon.pipeline.codec import Limits, ModelSpec, check_request
from daemon.pipeline.intake import Intake
from daemon.pipeline.ledger import ForgottenContent, Ledger
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.offsets import OffsetBook
from daemon.pipeline.receipts import ReceiptChain
from daemon.pipeline.salvage import salvage_fields
from tests.pipeline_harness import ROOT, request

Record = namedtuple("Record", "topic partition offset key value timestamp")
TP = TopicPartition("requests", 0)
CORPUS = {json.loads(line)["name"]: json.loads(line)
          for line in (Path(__file__).parent / "corpus" / "bad_requests.jsonl").read_text().splitlines()}


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec(name="mnist-cnn", input_shape=(1, 28, 28), num_classes=10,
                     sources=builtin_sources(load_mnist()))


def _intake(tmp_path: Path, spec: ModelSpec, predicted: int = 5) -> tuple[Intake, Ledger]:
    ledger = Ledger(tmp_path / "l.sqlite")
    intake = Intake(ledger, specs={spec.name: spec}, predictors={spec.name: lambda x: [predicted] * len(x)},
                    limits=Limits(), batcher=Batcher(64, 1.0), offsets=OffsetBook(),
                    receipts=ReceiptChain("d1", "receipts"), dlq_topic="dlq", metrics=DaemonMetrics(),
                    versions=lambda _m: 7)
    return intake, ledger


def _record(offset: int, value: bytes) -> Record:
    return Record(TP.topic, TP.partition, offset, b"mnist-cnn", value, 1_000 + offset)


def _receipts(ledger: Ledger) -> list[dict]:
    return [json.loads(r.value) for r in ledger.outbox() if r.topic == "receipts"]


# -- rejections the strict reader refuses, whose request id is plain to see ----------------------------------
@pytest.mark.parametrize("name", ["nan_label", "infinity_label", "huge_integer", "utf8_bom", "nested_2000_deep",
                                  "nested_100000_deep"])
def test_a_not_json_message_with_a_readable_request_id_gets_a_rejected_receipt(tmp_path, spec, name):
    intake, ledger = _intake(tmp_path, spec)
    value = base64.b64decode(CORPUS[name]["value_b64"])
    intake.process([_record(0, value)])
    [receipt] = _receipts(ledger)
    assert (receipt["request_id"], receipt["status"], receipt["reason"]) == (f"corpus-{name}", "rejected", "not_json")
    assert receipt["model"] == "mnist-cnn" and receipt["kind"] == "forget"
    assert ledger.request(f"corpus-{name}")["status"] == "rejected"
    [dlq] = [r for r in ledger.outbox() if r.topic == "dlq"]
    assert dlq.value == value                       # the original bytes, unchanged


def test_the_tolerant_reader_is_bounded_and_refuses_what_is_ambiguous(spec):
    names = frozenset({"request_id"})
    flat = b'{"a": ' + b"[1," * 340_000 + b' "request_id": "x"}'        # ~1 MiB of tokens: the walk gives up
    start = time.perf_counter()
    assert salvage_fields(flat.decode(), names) == {}
    assert time.perf_counter() - start < 1.0
    assert salvage_fields('{"request_id": "a", "x": NaN, "request_id": "b"}', names) == {}     # which one?
    assert salvage_fields('{"x": {"request_id": "inner"}, "y": NaN}', names) == {}             # not top level
    assert salvage_fields('{"schema": "unlearn.request/v1", "request_id": "trunc', names) == {}
    bad_id = b'{"request_id": "' + b"r" * 129 + b'", "x": NaN}'                               # over the limit
    with pytest.raises(Exception) as exc:
        check_request(bad_id, None, {spec.name: spec})
    assert exc.value.request_id is None


# -- an instance forgotten before --------------------------------------------------------------------------
def _forgotten(ledger: Ledger, spec: ModelSpec, body: dict, label: int) -> None:
    """Record ``body``'s instances as forgotten (as label ``label``) by a committed round r-000001 (version 2)."""
    checked = check_request(json.dumps(body).encode(), None, {spec.name: spec})
    round_id = ledger.allocate_round(spec.name, "d1", [body["request_id"]])
    with ledger.transaction() as tx:
        tx.end_round(round_id, "committed", version=2)
        tx.finish(body["request_id"], "applied", model=spec.name, kind="forget", round_id=round_id, model_version=2)
        tx.add_forgotten_content(spec.name, [ForgottenContent(f"c{i}", inst.id_sha256, body["request_id"], round_id,
                                                              "forget", label)
                                             for i, inst in enumerate(checked.instances)])


def test_reforgetting_an_instance_already_forgotten_is_answered_already_forgotten(tmp_path, spec):
    intake, ledger = _intake(tmp_path, spec, predicted=5)        # today's prediction: 5, forgotten as 3
    first = request("f-1", refs=["mnist-train:0"])
    _forgotten(ledger, spec, first, label=3)
    again = request("f-2", refs=["mnist-train:0"])
    again["instances"][0]["id"] = first["instances"][0]["id"]    # the same instance, no label
    intake.process([_record(0, json.dumps(again).encode())])
    assert list(intake.batcher.waiting()) == []                  # no round: nothing to forget
    [receipt] = _receipts(ledger)
    assert receipt["status"] == "applied" and receipt["reason"].startswith("already_forgotten")
    assert (receipt["round_id"], receipt["model_version"], receipt["previous_version"]) == ("r-000001", 2, 7)
    assert receipt["instances"][0]["label"] == 3 and receipt["instances"][0]["prediction_after"] == 5
    assert ledger.request("f-2")["status"] == "applied"
    intake.process([_record(0, json.dumps(again).encode())])     # redelivered: decided once
    assert len(_receipts(ledger)) == 1


def test_an_instance_forgotten_before_but_predicted_as_its_label_again_is_reforgotten_as_that_label(tmp_path, spec):
    intake, ledger = _intake(tmp_path, spec, predicted=3)        # a rollback: the model predicts 3 again
    first = request("g-1", refs=["mnist-train:0"])
    _forgotten(ledger, spec, first, label=3)
    again = request("g-2", refs=["mnist-train:0", "mnist-train:1"])
    again["instances"][0]["id"] = first["instances"][0]["id"]
    intake.process([_record(0, json.dumps(again).encode())])
    [pending] = intake.batcher.waiting()
    assert pending.request_id == "g-2" and pending.labels == [3, 3]
    assert _receipts(ledger) == []


# -- configuration: refused with a message and exit 2, not a traceback at start ------------------------------
def _config(tmp_path: Path, extra: str = "", state: Path | None = None) -> Path:
    path = tmp_path / "u.toml"
    path.write_text(f'[state]\ndir = "{state or tmp_path / "state"}"\n[registry]\ndir = "{tmp_path / "reg"}"\n'
                    f'{extra}\n[[models]]\nname = "mnist-cnn"\ndataset = "mnist"\n')
    return path


def _unlearnd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("extra", "env", "message"), [
    ("[metrics]\nport = 70000", {}, "metrics.port: must be a TCP port, 1-65535"),
    ("[kafka]\nbootstrap = \"127.0.0.1:notaport\"", {}, "kafka.bootstrap: '127.0.0.1:notaport' is not host:port"),
    ("", {"UNLEARND_KAFKA_BOOTSTRAP": "127.0.0.1:99999"}, "port 99999 is outside 1-65535"),
    ("[kafka]\npartitions = 1000000000", {}, "kafka.partitions: must be at most 1024"),
    ("", {"UNLEARND_STATE_DIR": "/proc/self"}, "state.dir: /proc/self is not"),
], ids=["metrics_port", "bootstrap_syntax", "bootstrap_port", "partitions", "state_dir_proc"])
def test_config_check_refuses_what_the_daemon_would_die_on(tmp_path, monkeypatch, capsys, extra, env, message):
    from daemon.cli import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["config", "check", "--config", str(_config(tmp_path, extra))]) == 2
    assert message in capsys.readouterr().err


def test_the_daemon_refuses_to_start_on_a_state_dir_that_is_a_file(tmp_path, capsys):
    from daemon.cli import main

    state = tmp_path / "a-file"
    state.write_text("")
    assert main(["run", "--config", str(_config(tmp_path, state=state / "state"))]) == 2
    err = capsys.readouterr().err
    assert "state.dir" in err and "is not a directory" in err, err


def test_world_writable_state_and_registry_folders_are_warned_about(tmp_path, capsys):
    from daemon.cli import main

    for name in ("state", "reg"):
        (tmp_path / name).mkdir()
        (tmp_path / name).chmod(0o777)
    assert main(["config", "check", "--config", str(_config(tmp_path))]) == 0
    err = capsys.readouterr().err
    assert "warning: state.dir:" in err and "warning: registry.dir:" in err
    assert "world-writable" in err and "chmod o-w" in err
    (tmp_path / "state").chmod(0o700)
    (tmp_path / "reg").chmod(0o755)
    assert main(["config", "check", "--config", str(_config(tmp_path))]) == 0
    assert "warning" not in capsys.readouterr().err


# -- the ledger half of item 1: a stranded request id is accepted again --------------------------------------
def test_a_stranded_request_is_accepted_anew_and_keeps_its_first_receive_time(ledger_db):
    ledger = Ledger(ledger_db.target())
    with ledger.transaction() as tx:
        tx.accept("s-1", "m", "forget", 1, 100.0)
    assert [r["request_id"] for r in ledger.accepted_requests()] == ["s-1"]
    with ledger.transaction() as tx:
        tx.finish("s-1", "stranded", model="m", kind="forget", reason="stranded: gone")
    assert ledger.accepted_requests() == []
    with ledger.transaction() as tx:
        assert tx.request("s-1")["status"] == "stranded"
        tx.accept("s-1", "m", "forget", 2, 200.0)
        assert tx.request("s-1")["status"] == "accepted"
    row = ledger.request("s-1")
    assert (row["status"], row["reason"], row["received_at"], row["instances"], row["attempts"]) == (
        "accepted", None, 100.0, 2, 1)
    with ledger.transaction() as tx:                 # an applied request is never reopened by an accept
        tx.finish("s-1", "applied", model="m", kind="forget")
        tx.accept("s-1", "m", "forget", 1, 300.0)
    assert ledger.request("s-1")["status"] == "applied"


@pytest.mark.slow
def test_the_daemon_logs_a_warning_for_a_world_writable_state_folder_at_start(tmp_path, mnist_registry):
    from tests.pipeline_harness import copy_registry, free_port, write_config

    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    cfg = write_config(tmp_path / "u.toml", bootstrap=f"127.0.0.1:{free_port()}", state_dir=state,
                       registry_dir=copy_registry(mnist_registry, tmp_path / "registry"))
    got = _unlearnd("run", "--config", str(cfg), env={"UNLEARND_KAFKA_STARTUP_WAIT_S": "0"})
    assert got.returncode == 1 and "cannot reach the broker" in got.stderr, got.stderr[-2000:]
    events = [json.loads(line) for line in got.stderr.splitlines() if line.startswith("{")]
    [warning] = [e for e in events if e.get("event") == "config_warning"]
    assert "state.dir" in warning["detail"] and "world-writable" in warning["detail"]


def test_the_embedded_broker_refuses_a_storage_engine_this_tansu_lacks_and_names_the_durable_one(capsys):
    from daemon.cli import main
    from tests.pipeline_harness import free_port

    assert main(["broker", "--port", str(free_port()), "--storage", "sqlite:///tmp/tansu.db"]) == 2
    err = capsys.readouterr().err
    assert "sqlite://" in err and "s3://" in err and "durable" in err
