"""The server's settings: one frozen object, every value checked at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from daemon import registry
from daemon.endpoint_auth import TlsFiles
from daemon.registry import ops as registry_ops

__all__ = ["ServeSettings"]

INPUT_NAME = "INPUT__0"      # the names config.pbtxt gives Triton, so clients work against both servers
OUTPUT_NAME = "OUTPUT__0"


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``unlearnd serve`` can be told.

    Attributes:
        registry: the registry root.
        model: the model served (a directory under ``registry``).
        host, port: where to listen (port 0 picks a free one).
        poll_interval_s: how often ``LATEST`` is read (the fallback when no publisher notifies).
        threads: inference threads (requests are parsed and run there; the event loop only does HTTP).
        torch_threads: intra-op threads of one inference (1 suits small models and many requests).
        max_body_bytes: the largest request body accepted (after decompression); larger gets 413.
        max_batch_size: the largest batch one request may carry.
        lease_ttl_s: how long this server's lease protects its version without a refresh.
        load_nice: how much lower the CPU priority of full loads found by polling is (a loader thread's).
        verify_process: verify each version in a helper process (``daemon.serving.verifier``) instead of
            in the serving process, whose requests would otherwise wait behind the hashing and checks.
        verify_nice: how much lower the helper process's CPU priority is.
        verify_idle: the helper verifies at SCHED_IDLE, raised to its nice value after 0.2 s without CPU.
        request_slice_us: the CPU scheduler slice of the threads that serve requests, in µs (0: the kernel's
            default; Linux 6.12+, ``daemon.serving.sched``): shorter, a woken request thread preempts other work.
        server_id: this server's lease name (``None``: host-pid-port).
        access_log: log every request (uvicorn's access log).
        log_level: debug, info, warning or error.
        log_format: json or console.
        token: the bearer token (read from ``--token-file``; never printed: ``repr`` leaves it out). With it, the
            repository endpoints and ``/metrics`` need ``Authorization: Bearer <token>``.
        auth_inference: inference and model metadata need the token too.
        tls: certificate, key and optional client CA (mutual TLS) to serve HTTPS.
        header_timeout_s: a request's headers must arrive within this (else 408, connection closed).
        body_timeout_s: its body within this after the headers (else 408).
        max_header_bytes: largest request head (else 431).
        max_connections: connections held at once; over it the longest-waiting one is closed
            (``daemon.serving.guard``). 0: the open-files limit less a reserve.
        registry_url: an ``s3://bucket/prefix`` registry; ``registry`` is then the local cache its versions are
            pulled into (verified) before they are served. None: ``registry`` is the registry.
        s3_endpoint_url, s3_region: the object store of ``registry_url`` (empty: AWS's, the environment's).
    """

    registry: Path
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    poll_interval_s: float = 0.2
    threads: int = 2
    torch_threads: int = 1
    max_body_bytes: int = 16 * 1024 * 1024
    max_batch_size: int = registry.DEFAULT_MAX_BATCH_SIZE
    lease_ttl_s: float = registry_ops.DEFAULT_LEASE_TTL_S
    load_nice: int = 10
    verify_process: bool = True
    verify_nice: int = 19
    verify_idle: bool = True
    request_slice_us: int = 300
    server_id: str | None = None
    access_log: bool = False
    log_level: str = "info"
    log_format: str = "json"
    token: str | None = field(default=None, repr=False)
    auth_inference: bool = False
    tls: TlsFiles = field(default_factory=TlsFiles)
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 0
    registry_url: str | None = None
    s3_endpoint_url: str = ""
    s3_region: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "registry", Path(self.registry))
        registry.layout._check_model_name(self.model)   # noqa: SLF001 - the one definition of a safe model name
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if not self.host:
            raise ValueError("host must not be empty")
        if not self.poll_interval_s > 0:
            raise ValueError(f"poll interval must be > 0 seconds, got {self.poll_interval_s!r}")
        for name in ("threads", "torch_threads", "max_body_bytes", "max_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lease_ttl_s > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {self.lease_ttl_s!r}")
        if isinstance(self.load_nice, bool) or not isinstance(self.load_nice, int) or not 0 <= self.load_nice <= 19:
            raise ValueError(f"load_nice must be an integer in [0, 19], got {self.load_nice!r}")
        if isinstance(self.verify_nice, bool) or not isinstance(self.verify_nice, int) or not 0 <= self.verify_nice <= 19:
            raise ValueError(f"verify_nice must be an integer in [0, 19], got {self.verify_nice!r}")
        if (isinstance(self.request_slice_us, bool) or not isinstance(self.request_slice_us, int)
                or not (self.request_slice_us == 0 or 100 <= self.request_slice_us <= 100_000)):
            raise ValueError(f"request_slice_us must be 0 or an integer in [100, 100000], got {self.request_slice_us!r}")
        if self.server_id is not None:
            registry_ops._check_server_id(self.server_id)   # noqa: SLF001 - same rule as the lease files
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log level must be debug, info, warning or error, got {self.log_level!r}")
        if self.log_format not in ("json", "console"):
            raise ValueError(f"log format must be json or console, got {self.log_format!r}")
        if self.auth_inference and self.token is None:
            raise ValueError("requiring a token for inference needs the token: give --token-file")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if isinstance(self.max_header_bytes, bool) or not isinstance(self.max_header_bytes, int) \
                or self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be an integer >= 1024, got {self.max_header_bytes!r}")
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int) \
                or self.max_connections < 0:
            raise ValueError(f"max_connections must be an integer >= 0 (0: from the open-files limit), "
                             f"got {self.max_connections!r}")
