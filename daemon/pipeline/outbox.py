"""The outbox publisher: moves receipts, DLQ copies and model events from the ledger to the broker.

It runs on its own thread so a broker outage never blocks intake or rounds; a row leaves the outbox
only after the broker acknowledged it (acks=all). A crash between the acknowledgement and the delete
publishes that row again, byte for byte the same (same audit entry): consumers deduplicate receipts
by ``audit.entry``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from kafka.errors import KafkaError, MessageSizeTooLargeError

from daemon.pipeline.config import KafkaSection
from daemon.pipeline.kafka_io import make_producer
from daemon.pipeline.ledger import Ledger, LedgerUnavailable, OutboxRow
from daemon.pipeline.metrics import DaemonMetrics

__all__ = ["OutboxPublisher", "kafka_producer_factory"]

log = structlog.get_logger("unlearnd.outbox")


def kafka_producer_factory(kafka: KafkaSection, max_request_size: int = 16 << 20) -> Callable[[], Any]:
    """The outbox's producer, made when the first row waits (and again after broker trouble)."""
    # a page is sent, then flushed: lingering costs nothing (flush sends at once) and lets the page go
    # out in a few large batches rather than one produce request per row
    return lambda: make_producer(kafka, client="outbox", max_request_size=max_request_size, linger_ms=1000,
                                 batch_size=256 << 10)


class OutboxPublisher:
    """A thread moving outbox rows to the broker; ``producer_factory`` makes a kafka-python-like producer."""

    def __init__(self, ledger: Ledger, metrics: DaemonMetrics, *, interval_s: float,
                 producer_factory: Callable[[], Any], send_timeout_s: float, page: int = 500) -> None:
        self.ledger = ledger
        self.page = page
        self.metrics = metrics
        self.interval_s = interval_s
        self.send_timeout_s = send_timeout_s
        self._producer_factory = producer_factory
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._producer = None

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Try to empty the outbox for a while, then stop; what remains waits for the next start. Idempotent."""
        deadline = time.monotonic() + flush_timeout_s
        while self.ledger.outbox_size() and time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=flush_timeout_s + 5)
        if self._producer is not None:
            try:
                self._producer.close(timeout=2)
            except KafkaError:
                pass
            self._producer = None

    def _run(self) -> None:
        backlog = False
        while not self._stop.is_set():
            if not backlog:             # a full page means more rows wait: go on at once
                self._wake.wait(self.interval_s)
            self._wake.clear()
            backlog = False
            try:
                backlog = self.flush_once() >= self.page
            except LedgerUnavailable as exc:    # the database is away (a restart): the rows wait there, unharmed
                log.warning("outbox_ledger_unavailable", error=str(exc))
                self._stop.wait(min(2.0, self.interval_s * 4))
            except Exception as exc:  # noqa: BLE001 - the thread must survive any broker trouble
                self.metrics.broker_up.set(0)
                log.warning("outbox_publish_failed", error=f"{type(exc).__name__}: {exc}", waiting=self._waiting())
                self._drop_producer()
                self._stop.wait(min(2.0, self.interval_s * 4))

    def _waiting(self) -> int | None:
        """The outbox's size for a log line; None when the ledger cannot say (nothing here may end the thread)."""
        try:
            return self.ledger.outbox_size()
        except Exception:  # noqa: BLE001
            return None

    def _drop_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=0.5)
            except Exception:  # noqa: BLE001
                pass
            self._producer = None

    def _replace_oversized(self, row: OutboxRow, exc: Exception) -> None:
        """Publish what can be published of an oversized row: its headers, and the size it had."""
        log.error("outbox_row_too_large", seq=row.seq, topic=row.topic, bytes=len(row.value), error=str(exc))
        headers = [*row.headers, ("error.original_bytes", str(len(row.value)).encode()),
                   ("error.truncated", b"value omitted: larger than the producer's max_request_size")]
        self.ledger.replace_outbox_value(row.seq, b"", headers)

    def flush_once(self) -> int:
        rows = self.ledger.outbox(self.page)
        self.metrics.outbox.set(len(rows))
        if not rows:
            return 0
        if self._producer is None:
            self._producer = self._producer_factory()
        futures = []
        for row in rows:
            try:
                futures.append((row.seq, self._producer.send(row.topic, key=row.key, value=row.value,
                                                             headers=row.headers)))
            except MessageSizeTooLargeError as exc:
                # Never retriable: a row the broker can never take must not block the rows behind it.
                self._replace_oversized(row, exc)
                break
        self._producer.flush(timeout=self.send_timeout_s)
        done = []
        for seq, fut in futures:
            try:
                fut.get(timeout=0)
            except Exception as exc:  # noqa: BLE001 - keep the row, retry later
                log.warning("outbox_row_not_acknowledged", seq=seq, error=f"{type(exc).__name__}: {exc}")
                break       # keep order: rows after a failed one wait too
            done.append(seq)
        self.ledger.acknowledge(done)
        self.metrics.broker_up.set(1 if len(done) == len(rows) else 0)
        self.metrics.outbox.set(self.ledger.outbox_size())
        if len(done) < len(rows):
            raise KafkaError(f"{len(rows) - len(done)} outbox rows not acknowledged")
        return len(done)
