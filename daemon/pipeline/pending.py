"""An accepted request between intake and its round: what the batcher groups and the runtime unlearns."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.pipeline.codec import DecodedRequest

__all__ = ["PendingRequest"]


@dataclass(frozen=True, eq=False)       # identity: the same request is never pending twice
class PendingRequest:
    """An accepted request waiting for its round (its data lives only here, in memory: Kafka holds the rest)."""

    decoded: DecodedRequest
    topic: str
    partition: int
    offset: int
    received_at: float          # wall clock (epoch seconds): the first time the ledger saw the request
    labels: list[int]           # the request's labels, or the model's predictions at intake
    targets: list[int] | None

    @property
    def request_id(self) -> str:
        return self.decoded.request_id

    @property
    def model(self) -> str:
        return self.decoded.model

    @property
    def id_hashes(self) -> list[str]:
        return [i.id_sha256 for i in self.decoded.instances]

    @property
    def size(self) -> int:
        return len(self.decoded.instances)

    def group(self) -> tuple[str, int | None, str | None]:
        """Requests that can share a round: the same kind (and, for forget_class, the same class) and the same goal
        as the request named it (None: the model's default; a round has one stopping rule)."""
        return self.decoded.kind, self.decoded.forget_class, self.decoded.goal
