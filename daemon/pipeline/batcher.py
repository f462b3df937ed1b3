"""Which accepted requests run together, and when: pure bookkeeping, no broker, no clock of its own.

A model's requests wait until they hold ``max_instances`` instances or the oldest has waited
``max_wait_s``; a round takes the oldest request's group (kind, class for ``forget_class``, and goal) up to
``max_instances``. The halves of a failed round (``rounds.split_failed``) run first, each as a round of
its own: their requests are the oldest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

from kafka import TopicPartition

from daemon.pipeline.pending import PendingRequest

__all__ = ["Batcher"]


class Batcher:
    """The requests waiting per model, the halves of failed rounds, and the batch now running."""

    def __init__(self, max_instances: int, max_wait_s: float) -> None:
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}")
        self.max_instances = max_instances
        self.max_wait_s = max_wait_s
        self.pending: dict[str, list[PendingRequest]] = defaultdict(list)
        self.halves: dict[str, list[list[PendingRequest]]] = defaultdict(list)
        self.first_pending_at: dict[str, float] = {}      # monotonic seconds
        self.running: list[PendingRequest] = []
        self.held: set[str] = set()     # models whose rounds wait (a deferred round waits for the model's rebase)

    def add(self, p: PendingRequest, now: float) -> None:
        self.pending[p.model].append(p)
        self.first_pending_at.setdefault(p.model, now)

    def waiting(self) -> Iterator[PendingRequest]:
        """Every accepted request without its outcome yet: pending, split off a failed round, or running."""
        yield from (p for ps in self.pending.values() for p in ps)
        yield from (p for halves in self.halves.values() for half in halves for p in half)
        yield from self.running

    def is_waiting(self, request_id: str | None) -> bool:
        return any(p.request_id == request_id for p in self.waiting())

    def next_due(self, now: float) -> list[PendingRequest] | None:
        """The next round's batch (then :attr:`running`), or None while nothing is due."""
        for model, halves in self.halves.items():
            if halves and model not in self.held:  # the rest of a failed round goes first: its requests are the oldest
                self.running = halves.pop(0)
                return self.running
        for model, items in self.pending.items():
            if not items or model in self.held:
                continue
            waited = now - self.first_pending_at.get(model, now)
            if sum(p.size for p in items) < self.max_instances and waited < self.max_wait_s:
                continue
            batch = self._take(items)
            taken = {id(p) for p in batch}
            self.pending[model] = [p for p in items if id(p) not in taken]
            if self.pending[model]:
                self.first_pending_at[model] = now
            else:
                self.first_pending_at.pop(model, None)
            self.running = batch
            return batch
        return None

    def _take(self, items: list[PendingRequest]) -> list[PendingRequest]:
        """The oldest request's group, in order, up to ``max_instances`` (always at least one request)."""
        group = items[0].group()
        batch: list[PendingRequest] = []
        total = 0
        for p in items:
            if p.group() != group:
                continue
            if batch and total + p.size > self.max_instances:
                break
            batch.append(p)
            total += p.size
        return batch

    def settle(self) -> list[PendingRequest]:
        """The running batch has an outcome: it no longer waits. Returns it."""
        batch, self.running = self.running, []
        return batch

    def retry(self, batch: list[PendingRequest], now: float) -> None:
        """Put an aborted or crashed round's requests back in front of their model's queue."""
        if batch:
            model = batch[0].model
            self.pending[model] = batch + self.pending[model]
            self.first_pending_at.setdefault(model, now)

    def split(self, batch: list[PendingRequest]) -> None:
        """A failed round runs again as two rounds of half its requests, before anything else of its model."""
        half = (len(batch) + 1) // 2
        self.halves[batch[0].model][:0] = [batch[:half], batch[half:]]

    def drop(self, revoked: Iterable[TopicPartition]) -> None:
        """Forget the requests of partitions this daemon no longer owns (their new owner redelivers them)."""
        revoked = set(revoked)

        def kept(items: list[PendingRequest]) -> list[PendingRequest]:
            return [p for p in items if TopicPartition(p.topic, p.partition) not in revoked]

        for model, halves in list(self.halves.items()):
            self.halves[model] = [half for half in map(kept, halves) if half]
        for model, items in list(self.pending.items()):
            self.pending[model] = kept(items)
            if not self.pending[model]:
                self.first_pending_at.pop(model, None)
