"""Which Kafka offsets are safe to commit: past every message whose effect is durable, never past one in flight.

An accepted request stays *in flight* until its round decided it (applied or failed, durably); every
other message is decided in the ledger by the intake transaction that read it. The safe offset of a
partition is its oldest in-flight offset, or the next offset to read when none is in flight.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from kafka import TopicPartition

__all__ = ["OffsetBook"]


class OffsetBook:
    """Per partition: offsets in flight, the next offset to read, and what was last committed."""

    def __init__(self) -> None:
        self.inflight: dict[TopicPartition, set[int]] = defaultdict(set)
        self.next_offset: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}

    def read(self, tp: TopicPartition, offset: int) -> None:
        """A message was read (in order per partition; a broker that lost its log restarts at 0)."""
        self.next_offset[tp] = offset + 1

    def hold(self, tp: TopicPartition, offset: int) -> None:
        """The message is an accepted request: not safe to commit past until its round decided it."""
        self.inflight[tp].add(offset)

    def release(self, tp: TopicPartition, offset: int) -> None:
        self.inflight[tp].discard(offset)

    def safe(self) -> dict[TopicPartition, int]:
        return {tp: (min(self.inflight[tp]) if self.inflight.get(tp) else nxt) for tp, nxt in self.next_offset.items()}

    def to_commit(self, assigned: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Safe offsets that moved since the last commit, on partitions still assigned."""
        assigned = set(assigned)
        return {tp: off for tp, off in self.safe().items() if self.committed.get(tp) != off and tp in assigned}

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.update(offsets)

    def forget(self, revoked: Iterable[TopicPartition]) -> None:
        for tp in revoked:
            self.inflight.pop(tp, None)
            self.next_offset.pop(tp, None)
            self.committed.pop(tp, None)

    def lag(self, tp: TopicPartition, highwater: int | None) -> int | None:
        """Records not yet read on ``tp`` (None when unknown)."""
        if highwater is None or tp not in self.next_offset:
            return None
        return max(0, highwater - self.next_offset[tp])
