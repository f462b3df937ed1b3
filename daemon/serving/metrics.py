"""The server's Prometheus metrics, defined in one place against an injected registry.

Series by version grow with every published version, so only the newest ``version_series`` versions keep
their request series; older ones are removed once a newer version has answered (their totals are in the
scrapes already taken).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["LOAD_FAILURE_REASONS", "LOAD_KINDS", "SWAP_OUTCOMES", "ServeMetrics"]

SWAP_OUTCOMES = ("swapped", "failed")
LOAD_KINDS = ("full", "weights")
# outside: a path resolves outside the registry; nonfinite: NaN/inf weights; mismatch: a serving file's outputs
# disagree with the weights (daemon.registry.trust); backwards: LATEST names a version older than one served.
LOAD_FAILURE_REASONS = ("missing", "verification", "load", "warmup", "registry", "outside", "nonfinite",
                        "mismatch", "backwards")
# Latency of one tiny-model request is sub-millisecond; a swap's load is tens of milliseconds.
_REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5)
_SWAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    """Request counts and latency by served version, swaps by outcome, load failures by reason."""

    def __init__(self, registry: CollectorRegistry | None = None, *, version_series: int = 8) -> None:
        if version_series < 1:
            raise ValueError(f"version_series must be >= 1, got {version_series}")
        self.registry = registry if registry is not None else CollectorRegistry()
        self._keep = version_series
        self._lock = threading.Lock()
        self._codes: OrderedDict[str, set[str]] = OrderedDict()   # version -> codes seen, oldest first
        r = self.registry
        self.requests = Counter("unlearnd_serve_requests", "Inference requests by answering version and HTTP code",
                                ["version", "code"], registry=r)
        self.duration = Histogram("unlearnd_serve_request_duration_seconds",
                                  "Inference request latency in the server, by answering version", ["version"],
                                  buckets=_REQUEST_BUCKETS, registry=r)
        self.swaps = Counter("unlearnd_serve_swaps", "Attempts to serve a new version, by outcome", ["outcome"],
                             registry=r)
        self.load_failures = Counter("unlearnd_serve_load_failures", "Versions refused, by reason", ["reason"],
                                     registry=r)
        self.swap_duration = Histogram("unlearnd_serve_swap_duration_seconds",
                                       "Verify, load and warm up a new version, until it serves",
                                       buckets=_SWAP_BUCKETS, registry=r)
        self.loads = Counter("unlearnd_serve_loads", "Versions swapped in, by how they were loaded: full "
                             "(TorchScript deserialised and warmed up) or weights (copied into the standby)",
                             ["kind"], registry=r)
        self.model_version = Gauge("unlearnd_serve_model_version", "The version being served (0: none)",
                                   registry=r)
        for outcome in SWAP_OUTCOMES:
            self.swaps.labels(outcome)
        for reason in LOAD_FAILURE_REASONS:
            self.load_failures.labels(reason)
        for kind in LOAD_KINDS:
            self.loads.labels(kind)

    def observe_request(self, version: int | None, code: int, seconds: float) -> None:
        v = str(version) if version is not None else "none"
        c = str(code)
        self.requests.labels(v, c).inc()
        self.duration.labels(v).observe(seconds)
        with self._lock:
            codes = self._codes.get(v)
            if codes is None:
                self._codes[v] = {c}
                self._retire()
            else:
                codes.add(c)

    def _retire(self) -> None:
        while len(self._codes) > self._keep:
            old, codes = self._codes.popitem(last=False)
            for c in codes:
                self.requests.remove(old, c)
            self.duration.remove(old)

    def swapped(self, version: int, seconds: float, kind: str = "full") -> None:
        if kind not in LOAD_KINDS:
            raise ValueError(f"unknown load kind {kind!r}; known: {', '.join(LOAD_KINDS)}")
        self.swaps.labels("swapped").inc()
        self.loads.labels(kind).inc()
        self.swap_duration.observe(seconds)
        self.model_version.set(version)

    def refused(self, reason: str) -> None:
        if reason not in LOAD_FAILURE_REASONS:
            raise ValueError(f"unknown load failure reason {reason!r}; known: {', '.join(LOAD_FAILURE_REASONS)}")
        self.swaps.labels("failed").inc()
        self.load_failures.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
