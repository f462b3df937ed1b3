"""The daemon's wiring and lifecycle with stand-in Kafka clients: a real ledger, model, registry and round."""

from __future__ import annotations

import json
import threading
import time
from collections import namedtuple

import pytest
import torch
from kafka import TopicPartition

from daemon import registry
from daemon.pipeline.config import load_config
from daemon.pipeline.assembly import build_daemon
from tests.pipeline_harness import copy_registry, request

Record = namedtuple("Record", "topic partition offset key value timestamp")
TP = TopicPartition("unlearn.requests", 0)


class _Consumer:
    """Hands out its records in one poll, then nothing; records what the daemon commits, pauses and closes."""

    def __init__(self, records: list[Record]) -> None:
        self.queue, self.commits, self.paused_, self.closed = list(records), [], set(), False

    def subscribe(self, topics, listener):  # noqa: ANN001, ANN201
        self.topics = topics

    def poll(self, timeout_ms: int) -> dict:
        if self.queue:
            records, self.queue = self.queue, []
            return {TP: records}
        time.sleep(timeout_ms / 1000)
        return {}

    def assignment(self) -> set:
        return {TP}

    def pause(self, *tps) -> None:  # noqa: ANN002
        self.paused_.update(tps)

    def paused(self) -> set:
        return set(self.paused_)

    def resume(self, *tps) -> None:  # noqa: ANN002
        self.paused_ -= set(tps)

    def commit(self, offsets: dict) -> None:
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})

    def highwater(self, tp) -> None:  # noqa: ANN001
        return None

    def close(self, autocommit: bool) -> None:
        self.closed = True


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def send(self, topic, key=None, value=None, headers=None):  # noqa: ANN001, ANN201
        self.sent.append((topic, value))
        return type("Acked", (), {"get": lambda self, timeout: None})()

    def flush(self, timeout: float) -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


def _until(predicate, timeout: float = 120.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_request_is_applied_its_replay_answered_and_offsets_committed_past_both_then_a_clean_stop(
        tmp_path, mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    config = load_config(None, env={"UNLEARND_REGISTRY_DIR": str(reg), "UNLEARND_STATE_DIR": str(tmp_path / "state"),
                                    "UNLEARND_KAFKA_CREATE_TOPICS": "false", "UNLEARND_METRICS_PORT": "0",
                                    "UNLEARND_ROUNDS_MAX_WAIT_S": "0", "UNLEARND_ROUNDS_THREADS": "1",
                                    "UNLEARND_ROUNDS_RETENTION_MAX_DROP": "0.5",
                                    "UNLEARND_MODELS_0_PROBE": "mnist-test:0-199"})
    body = json.dumps(request("a", refs=["mnist-train:7"])).encode()
    consumer = _Consumer([Record(TP.topic, 0, 0, b"mnist-cnn", body, 1), Record(TP.topic, 0, 1, b"mnist-cnn", body, 2)])
    producer, stop = _Producer(), threading.Event()
    daemon = build_daemon(config, stop=stop, consumer_factory=lambda: consumer, producer_factory=lambda: producer)
    daemon.start()
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(daemon.run()))
    loop.start()
    try:
        _until(lambda: sum(topic == "unlearn.receipts" for topic, _ in producer.sent) == 2
               and any(topic == "unlearn.models" for topic, _ in producer.sent))
        _until(lambda: consumer.commits and consumer.commits[-1] == {TP: 2})
    finally:
        stop.set()
        loop.join(timeout=60)
    assert result == [0] and consumer.closed and not consumer.paused_
    receipts = [json.loads(v) for topic, v in producer.sent if topic == "unlearn.receipts"]
    assert [(r["request_id"], r["status"]) for r in receipts] == [("a", "duplicate"), ("a", "applied")]
    assert receipts[1]["model_version"] == 2 == registry.latest_version(reg, "mnist-cnn")
    assert daemon.metrics.registry.get_sample_value("unlearnd_rounds_total", {"outcome": "applied"}) == 1
    assert daemon.metrics.registry.get_sample_value("unlearnd_model_version", {"model": "mnist-cnn"}) == 2
    # remaining capacity (issue 21) after the round, as the live version says
    rt, get = daemon.runtimes["mnist-cnn"], daemon.metrics.registry.get_sample_value
    model = {"model": "mnist-cnn"}
    assert get("unlearnd_deletions_since_base", model) == 1 == registry.read_manifest(
        reg, "mnist-cnn", 2)["deletions_since_base"]
    floor = get("unlearnd_retention_gate_floor_ratio", model)
    assert floor == rt.probe_accuracy("original") - 0.5
    assert get("unlearnd_retention_headroom_ratio", model) == rt.probe_accuracy("current") - floor > 0.4
    fill = rt.live.session.memory.fill()
    assert fill and get("unlearnd_memory_fill_ratio", {**model, "layer": next(iter(fill))}) == next(iter(fill.values()))
    assert 0 < get("unlearnd_memory_free_ratio", model) == 1 - min(fill.values()) < 1
    daemon.shutdown()                                        # idempotent: run() already shut it down


def test_an_idle_daemon_follows_latest_and_a_rebase_resets_its_capacity_gauges(tmp_path, mnist_registry,
                                                                                 monkeypatch):
    from daemon.engine.session import UnlearningSession
    from daemon.pipeline import lifecycle
    from daemon.registry import model_store

    reg = copy_registry(mnist_registry, tmp_path / "registry")
    live = model_store.load_live(reg, "mnist-cnn")

    def publish(method: str, session: UnlearningSession, instances: int = 0) -> int:
        return model_store.publish(reg, "mnist-cnn", live.model, session, input_shape=live.input_shape,
                                   classes=live.classes, parent=registry.latest_version(reg, "mnist-cnn"),
                                   method={"name": method}, instances=instances).version

    publish("adv_imp", live.session, instances=40)          # v2: 40 deletions on the pretrained base
    config = load_config(None, env={"UNLEARND_REGISTRY_DIR": str(reg), "UNLEARND_STATE_DIR": str(tmp_path / "state"),
                                    "UNLEARND_KAFKA_CREATE_TOPICS": "false", "UNLEARND_METRICS_PORT": "0",
                                    "UNLEARND_ROUNDS_THREADS": "1", "UNLEARND_ROUNDS_RETENTION_MAX_DROP": "0.05",
                                    "UNLEARND_MODELS_0_PROBE": "mnist-test:0-199"})
    monkeypatch.setattr(lifecycle, "LATEST_CHECK_INTERVAL_S", 0.1)
    stop = threading.Event()
    daemon = build_daemon(config, stop=stop, consumer_factory=lambda: _Consumer([]), producer_factory=_Producer)
    daemon.start()
    get, model = daemon.metrics.registry.get_sample_value, {"model": "mnist-cnn"}
    assert get("unlearnd_deletions_since_base", model) == 40 and get("unlearnd_model_version", model) == 2
    loop = threading.Thread(target=daemon.run)
    loop.start()
    try:
        # a rebase another process published: new weights, a fresh continual state; no request comes
        with torch.no_grad():
            for p in live.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        v3 = publish("rebase", UnlearningSession(live.model, num_classes=live.num_classes))
        _until(lambda: get("unlearnd_model_version", model) == v3, timeout=30)
    finally:
        stop.set()
        loop.join(timeout=60)
    assert daemon.runtimes["mnist-cnn"].version == v3
    assert get("unlearnd_deletions_since_base", model) == 0
    assert get("unlearnd_retention_headroom_ratio", model) == pytest.approx(0.05)    # its own original: the whole gate
    assert get("unlearnd_memory_free_ratio", model) == 1
    assert get("unlearnd_probe_accuracy_ratio", {"reference": "original"}) == \
        daemon.runtimes["mnist-cnn"].probe_accuracy("original")
