"""The outbox publisher against a real SQLite ledger and a stand-in producer (no broker)."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaError, MessageSizeTooLargeError

from daemon.pipeline.ledger import Ledger
from daemon.pipeline.metrics import DaemonMetrics
from daemon.pipeline.outbox import OutboxPublisher


class _Future:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float) -> None:
        if self.error is not None:
            raise self.error


class _Producer:
    """Acknowledges every send, except the values in ``refuse`` (not acknowledged) and ``too_large`` (raised)."""

    def __init__(self, refuse: set[bytes] = frozenset(), too_large: set[bytes] = frozenset()) -> None:
        self.refuse, self.too_large = refuse, too_large
        self.sent: list[tuple[str, bytes | None, bytes, list]] = []
        self.closed = False

    def send(self, topic, key=None, value=None, headers=None):  # noqa: ANN001, ANN201 - kafka-python's signature
        if value in self.too_large:
            raise MessageSizeTooLargeError("too large")
        self.sent.append((topic, key, value, headers))
        return _Future(KafkaError("no ack") if value in self.refuse else None)

    def flush(self, timeout: float) -> None:
        pass

    def close(self, timeout: float) -> None:
        self.closed = True


def _outbox(ledger: Ledger, producer: _Producer, page: int = 500) -> tuple[OutboxPublisher, DaemonMetrics]:
    metrics = DaemonMetrics()
    return OutboxPublisher(ledger, metrics, interval_s=0.01, producer_factory=lambda: producer, send_timeout_s=1.0,
                           page=page), metrics


def _fill(ledger: Ledger, values: list[bytes]) -> None:
    with ledger.transaction() as tx:
        for v in values:
            tx.enqueue("receipts", b"k", v, [("h", b"1")])


def test_rows_leave_the_outbox_only_once_acknowledged_in_order(ledger_db):
    ledger = Ledger(ledger_db.target())
    _fill(ledger, [b"a", b"b", b"c"])
    producer = _Producer(refuse={b"b"})
    outbox, metrics = _outbox(ledger, producer)
    with pytest.raises(KafkaError, match="2 outbox rows not acknowledged"):
        outbox.flush_once()
    assert [r.value for r in ledger.outbox()] == [b"b", b"c"]     # c waits behind b: order is kept
    assert metrics.registry.get_sample_value("unlearnd_broker_up") == 0
    producer.refuse = set()
    assert outbox.flush_once() == 2 and ledger.outbox_size() == 0
    assert [v for _, _, v, _ in producer.sent] == [b"a", b"b", b"c", b"b", b"c"]
    assert producer.sent[0][3] == [("h", b"1")]
    assert metrics.registry.get_sample_value("unlearnd_broker_up") == 1
    assert metrics.registry.get_sample_value("unlearnd_outbox_records") == 0


def test_a_row_the_broker_can_never_take_is_published_as_its_headers_and_size(ledger_db):
    ledger = Ledger(ledger_db.target())
    _fill(ledger, [b"huge", b"next"])
    producer = _Producer(too_large={b"huge"})
    outbox, _ = _outbox(ledger, producer)
    with pytest.raises(KafkaError):               # nothing went out this time: retried at the next tick
        outbox.flush_once()
    (row, _next) = ledger.outbox()
    assert row.value == b"" and ("error.original_bytes", b"4") in row.headers
    assert outbox.flush_once() == 2 and ledger.outbox_size() == 0


def test_the_thread_drains_the_outbox_and_stop_is_idempotent(ledger_db):
    ledger = Ledger(ledger_db.target())
    producer = _Producer()
    outbox, _ = _outbox(ledger, producer, page=2)
    outbox.stop(flush_timeout_s=0.1)              # never started: nothing to join
    outbox, _ = _outbox(ledger, producer, page=2)
    _fill(ledger, [b"1", b"2", b"3", b"4", b"5"])
    outbox.start()
    outbox.wake()
    outbox.stop(flush_timeout_s=5.0)
    outbox.stop(flush_timeout_s=5.0)
    assert ledger.outbox_size() == 0 and producer.closed
    assert [v for _, _, v, _ in producer.sent] == [b"1", b"2", b"3", b"4", b"5"]
