"""Thin kafka-python wrappers with the settings the broker here needs (see environment.md).

* static membership (``group_instance_id``): a restarted daemon gets its partitions back in seconds,
  and a member that closed mid-join cannot wedge the group;
* ``session_timeout_ms`` 6 s: each (re)join costs about half of it;
* manual commits only, ``auto_offset_reset="earliest"`` (end offsets are approximate on Tansu);
* a producer that never blocks the caller for long while the broker is away.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from daemon.pipeline.config import KafkaSection

__all__ = ["ensure_topics", "make_consumer", "make_producer"]


def make_consumer(cfg: KafkaSection) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=cfg.bootstrap.split(","),
        group_id=cfg.group_id,
        group_instance_id=cfg.instance_id,
        client_id=f"unlearnd-{cfg.instance_id}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        max_poll_interval_ms=cfg.max_poll_interval_ms,
        max_poll_records=cfg.max_poll_records,
        request_timeout_ms=max(cfg.request_timeout_ms, cfg.session_timeout_ms + 5000),
        reconnect_backoff_max_ms=2000,
    )


def make_producer(cfg: KafkaSection, *, client: str = "producer", max_request_size: int = 1 << 20,
                  linger_ms: int = 2, batch_size: int = 16384) -> KafkaProducer:
    return KafkaProducer(
        max_request_size=max_request_size,
        bootstrap_servers=cfg.bootstrap.split(","),
        client_id=f"unlearnd-{cfg.instance_id}-{client}",
        acks="all",
        retries=3,
        linger_ms=linger_ms,
        batch_size=batch_size,
        max_block_ms=cfg.request_timeout_ms,
        request_timeout_ms=cfg.request_timeout_ms,
        reconnect_backoff_max_ms=2000,
    )


def ensure_topics(cfg: KafkaSection, names: Iterable[str], partitions: dict[str, int] | None = None) -> list[str]:
    """Create the topics that are missing; returns those created. Errors other than 'exists' raise."""
    admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap.split(","), client_id=f"unlearnd-{cfg.instance_id}-admin",
                             request_timeout_ms=cfg.request_timeout_ms)
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        created = []
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, (partitions or {}).get(name, 1), 1)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        try:
            admin.close()
        except KafkaError:
            pass
