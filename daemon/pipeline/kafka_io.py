"""Thin kafka-python wrappers with the settings the broker here needs (see environment.md).

* static membership (``group_instance_id``): a restarted daemon gets its partitions back in seconds,
  and a member that closed mid-join cannot wedge the group;
* ``session_timeout_ms`` 6 s: each (re)join costs about half of it;
* manual commits only, ``auto_offset_reset="earliest"`` (end offsets are approximate on Tansu);
* a producer that never blocks the caller for long while the broker is away;
* the same transport security for every client (TLS, SASL; ``daemon.pipeline.kafka_security``), and a TLS
  handshake checked before the admin client would retry a refused certificate in silence.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

from daemon.pipeline.config import KafkaSection
from daemon.pipeline.kafka_security import client_kwargs, probe_tls

__all__ = ["check_broker_tls", "connection_kwargs", "ensure_topics", "explained_bootstrap", "make_consumer", "make_producer"]


def connection_kwargs(cfg: KafkaSection) -> dict[str, Any]:
    """Where the broker is and how to reach it safely: bootstrap servers plus the security settings."""
    return {"bootstrap_servers": [b.strip() for b in cfg.bootstrap.split(",") if b.strip()], **client_kwargs(cfg)}


class _BootstrapFailures(logging.Handler):
    """The reasons kafka-python gives, in a warning only, for each failed bootstrap connection (a refused SASL
    login, a TLS error): its own exception says only "Unable to bootstrap" after 30 s."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("Bootstrap connection to") and len(record.args or ()) >= 2:
            exc = record.args[1]    # type: ignore[index]
            if isinstance(exc, KeyError) and exc.args == ("v",):   # kafka-python's SCRAM, on a server-final "e=..."
                self.reasons.append("the broker refused the SCRAM login (its final SCRAM message was an error, "
                                    "not a signature: unknown user or wrong password)")
            else:
                self.reasons.append(str(exc) if isinstance(exc, KafkaError) else f"{type(exc).__name__}: {exc}")

    @property
    def telling(self) -> str | None:
        """The reason to report: the last one that is not a bare timeout (a loaded machine may time out a retry
        after the broker has already refused the login, and the refusal is what the user needs), else the last."""
        answers = [r for r in self.reasons if "timed out" not in r.lower()]
        return (answers or self.reasons or [None])[-1]


@contextlib.contextmanager
def explained_bootstrap() -> Iterator[_BootstrapFailures]:
    """Within the block, a ``KafkaTimeoutError`` raised by a client that could not bootstrap carries the last
    reason kafka-python saw (e.g. ``SaslAuthenticationFailedError``); those warnings are not printed meanwhile."""
    logger = logging.getLogger("kafka.net.manager")
    handler, level, propagate = _BootstrapFailures(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield handler
    except KafkaTimeoutError as exc:
        if handler.telling is None:
            raise
        raise KafkaTimeoutError(f"{exc.args[0] if exc.args else exc}; last failure: {handler.telling}") from exc
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def make_consumer(cfg: KafkaSection) -> KafkaConsumer:
    return KafkaConsumer(
        **connection_kwargs(cfg),
        group_id=cfg.group_id,
        group_instance_id=cfg.instance_id if cfg.static_membership else None,
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
        **connection_kwargs(cfg),
        max_request_size=max_request_size,
        client_id=f"unlearnd-{cfg.instance_id}-{client}",
        acks="all",
        retries=3,
        linger_ms=linger_ms,
        batch_size=batch_size,
        max_block_ms=cfg.request_timeout_ms,
        request_timeout_ms=cfg.request_timeout_ms,
        reconnect_backoff_max_ms=2000,
    )


def check_broker_tls(cfg: KafkaSection, kwargs: dict | None = None) -> None:
    """The broker's certificate, checked as the clients will check it: a refusal raises ``KafkaSecurityError`` at
    once, naming the setting (kafka-python alone would retry until its bootstrap timeout and say only "Unable to
    bootstrap"). Run before the first client connects, also when the daemon creates no topics."""
    kwargs = connection_kwargs(cfg) if kwargs is None else kwargs
    probe_tls(cfg, cfg.request_timeout_ms / 1000, kwargs.get("ssl_context"))


def ensure_topics(cfg: KafkaSection, names: Iterable[str], partitions: dict[str, int] | None = None) -> list[str]:
    """Create the topics that are missing; returns those created. Errors other than 'exists' raise (a refused TLS
    certificate as ``KafkaSecurityError``, at once, naming the setting)."""
    kwargs = connection_kwargs(cfg)
    check_broker_tls(cfg, kwargs)
    with explained_bootstrap():
        admin = KafkaAdminClient(**kwargs, client_id=f"unlearnd-{cfg.instance_id}-admin",
                                 request_timeout_ms=cfg.request_timeout_ms, bootstrap_timeout_ms=cfg.request_timeout_ms)
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
