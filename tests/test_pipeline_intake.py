"""Intake against a real SQLite ledger, with stand-in records (no broker) and a stand-in model."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch
from kafka import TopicPartition

from daemon.data.mnist import load_mnist
from daemon.data.sources import builtin_sources
from daemon.pipeline.batcher import Batcher
from daemon.pipeline.codec import Limits, ModelSpec, Rejection
from daemon.pipeline.intake import Intake, fill_labels
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.offsets import OffsetBook
from daemon.pipeline.receipts import ReceiptChain
from tests.pipeline_harness import request

Record = namedtuple("Record", "topic partition offset key value timestamp")
TP = TopicPartition("requests", 0)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec(name="mnist-cnn", input_shape=(1, 28, 28), num_classes=10,
                     sources=builtin_sources(load_mnist()))


def _intake(target: str, spec: ModelSpec) -> tuple[Intake, Ledger, DaemonMetrics]:
    ledger, metrics = Ledger(target), DaemonMetrics()
    intake = Intake(ledger, specs={spec.name: spec}, predictors={spec.name: lambda x: [5] * len(x)},
                    limits=Limits(), batcher=Batcher(64, 1.0), offsets=OffsetBook(),
                    receipts=ReceiptChain("d1", "receipts"), dlq_topic="dlq", metrics=metrics)
    return intake, ledger, metrics


def _record(offset: int, body: dict | bytes) -> Record:
    value = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Record(TP.topic, TP.partition, offset, b"mnist-cnn", value, 1_000 + offset)


def test_one_poll_accepts_rejects_and_recognises_duplicates_in_one_transaction(ledger_db, spec):
    intake, ledger, metrics = _intake(ledger_db.target(), spec)
    good = request("a", refs=["mnist-train:0", "mnist-train:1"], labels=[5])
    records = [_record(0, good), _record(1, b"{not json"), _record(2, request("a", refs=["mnist-train:9"])),
               _record(3, request("b", "relabel", ["mnist-train:2"], targets=[5]))]
    assert intake.process(records) is True
    (pending,) = intake.batcher.waiting()
    assert pending.request_id == "a" and pending.labels == [5, 5]       # the missing label: the model's prediction
    assert intake.offsets.safe() == {TP: 0}                              # held until its round decides it
    rows = ledger.outbox()
    assert [r.topic for r in rows] == ["dlq", "receipts", "dlq", "receipts"]
    statuses = [(json.loads(r.value)["request_id"], json.loads(r.value)["status"]) for r in rows if
                r.topic == "receipts"]
    assert statuses == [("a", "duplicate"), ("b", "rejected")]           # b's target is the predicted label
    assert ledger.request("a")["status"] == "accepted" and ledger.request("b")["status"] == "rejected"
    assert metrics.registry.get_sample_value("unlearnd_intake_messages_total") == 4
    assert metrics.registry.get_sample_value("unlearnd_dlq_total", {"reason": "not_json"}) == 1

    intake.process(records)                          # redelivered while "a" still waits: nothing is decided twice
    assert [p.request_id for p in intake.batcher.waiting()] == ["a"] and len(ledger.outbox()) == 4
    assert ledger.verify_audit() == (2, None)


def test_labels_come_from_the_request_the_class_or_the_model_and_relabel_needs_a_new_label(spec):
    from daemon.pipeline.codec import check_request, decode_inputs

    def decoded(body: dict):
        return decode_inputs(check_request(json.dumps(body).encode(), b"mnist-cnn", {spec.name: spec}, Limits()))

    calls = []

    def predict(x: torch.Tensor) -> list[int]:
        calls.append(len(x))
        return [8] * len(x)

    assert fill_labels(decoded(request("a", refs=["mnist-train:0", "mnist-train:1"], labels=[2])), predict) == (
        [2, 8], None)
    assert calls == [1]                                           # only the instance without a label
    assert fill_labels(decoded(request("c", "forget_class", ["mnist-train:0"], forget_class=4)), predict) == (
        [4], None)
    assert fill_labels(decoded(request("r", "relabel", ["mnist-train:0"], targets=[1])), predict) == ([8], [1])
    with pytest.raises(Rejection) as exc:
        fill_labels(decoded(request("r", "relabel", ["mnist-train:0"], targets=[8])), predict)
    assert exc.value.reason == "target_equals_label"
