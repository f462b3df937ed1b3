"""The daemon's Prometheus metrics (contract §6), on their own registry.

Histograms, not summaries (they aggregate across daemons); no label ever carries a request or
instance id, so cardinality stays bounded by kinds, statuses, reasons and partitions.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from daemon.endpoint_auth import TlsFiles
from daemon.engine.unseen import MembershipEvidence
from daemon.pipeline.metrics_http import start_metrics_server
from daemon.pipeline.receipts import RoundMetrics

__all__ = ["DaemonMetrics", "memory_free_share"]

_ROUND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_FORGET_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400)
#: what a round's membership evidence may say of its instances (daemon.engine.unseen.verdict)
VERDICTS = ("under", "indistinguishable", "over")


class DaemonMetrics:
    """Every metric the daemon exports; one instance per process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("unlearnd_requests", "Requests by outcome", ["kind", "status"], registry=r)
        self.dlq = Counter("unlearnd_dlq", "Messages sent to the dead-letter topic", ["reason"], registry=r)
        self.rounds = Counter("unlearnd_rounds", "Unlearning rounds by outcome", ["outcome"], registry=r)
        self.stale_owner = Counter("unlearnd_stale_owner_refusals",
                                   "Round commits or publishes refused because another daemon took the model over "
                                   "(its requests are left to that daemon)", ["model"], registry=r)
        self.round_duration = Histogram("unlearnd_round_duration_seconds", "One round, start to durable commit",
                                        buckets=_ROUND_BUCKETS, registry=r)
        self.time_to_forget = Histogram("unlearnd_time_to_forget_seconds",
                                        "Request received to its version published", buckets=_FORGET_BUCKETS,
                                        registry=r)
        self.pending = Gauge("unlearnd_pending_requests", "Requests accepted, not yet applied", registry=r)
        self.oldest_pending_age = Gauge("unlearnd_oldest_pending_age_seconds",
                                        "Age of the oldest accepted request not yet applied (the deletion clock)",
                                        registry=r)
        self.forget_accuracy = Gauge("unlearnd_forget_accuracy_ratio", "Last round, accuracy on its forget set",
                                     registry=r)
        self.probe_accuracy = Gauge("unlearnd_probe_accuracy_ratio", "Accuracy on the operator's probe set",
                                    ["reference"], registry=r)
        self.param_drift = Gauge("unlearnd_param_drift_l2", "L2 distance of the weights to a reference",
                                 ["reference"], registry=r)
        self.flip_ratio = Gauge("unlearnd_prediction_flip_ratio",
                                "Share of probe predictions changed against a reference", ["reference"], registry=r)
        self.importance_density = Gauge("unlearnd_importance_density_ratio",
                                        "Share of parameters the accumulated importance holds fixed", registry=r)
        self.memory_fill = Gauge("unlearnd_memory_fill_ratio",
                                 "Share of a layer's input directions the continual memory protects (1: the layer "
                                 "no longer changes in instance rounds)", ["model", "layer"], registry=r)
        self.memory_free = Gauge("unlearnd_memory_free_ratio",
                                 "Largest share of input directions still free in any layer the continual memory "
                                 "protects (0: no protected layer can change in instance rounds)", ["model"],
                                 registry=r)
        self.headroom = Gauge("unlearnd_retention_headroom_ratio",
                              "Probe accuracy above the retention gate's floor (0 or below: the next round is "
                              "refused)", ["model"], registry=r)
        self.gate_floor = Gauge("unlearnd_retention_gate_floor_ratio",
                                "Probe accuracy the retention gate refuses rounds below (original - "
                                "rounds.retention_max_drop)", ["model"], registry=r)
        self.deletions_since_base = Gauge("unlearnd_deletions_since_base",
                                          "Instances forgotten since the lineage's base version (pretrain, import "
                                          "or rebase)", ["model"], registry=r)
        self.membership_auc = Gauge("unlearnd_membership_auc",
                                    "Last applied forget round: membership AUC of its instances against the held-out "
                                    "probe set (0.5: look unseen; above: still member-like; below: over-forgotten)",
                                    ["model"], registry=r)
        self.membership_verdicts = Counter("unlearnd_membership_verdicts",
                                           "Applied forget rounds by what their membership evidence says (under, "
                                           "indistinguishable, over)", ["model", "verdict"], registry=r)
        self._membership_models: set[str] = set()
        self._fill_layers: dict[str, set[str]] = {}
        self.model_version = Gauge("unlearnd_model_version", "The published version", ["model"], registry=r)
        self.consumer_lag = Gauge("unlearnd_consumer_lag_records", "Kafka consumer lag (records)", ["partition"],
                                  registry=r)
        self.outbox = Gauge("unlearnd_outbox_records", "Receipts and events waiting for the broker", registry=r)
        self.intake = Counter("unlearnd_intake_messages", "Messages consumed from the requests topic", registry=r)
        self.ledger_unavailable = Counter("unlearnd_ledger_unavailable", "Calls that found the ledger's database "
                                          "away (each one is retried; nothing of it took effect)", registry=r)
        self.broker_up = Gauge("unlearnd_broker_up", "1 when the last publish to the broker succeeded", registry=r)
        self.rebases = Counter("unlearnd_rebases", "Exact rebases by outcome (committed, failed, aborted)",
                               ["model", "outcome"], registry=r)
        self.rebase_running = Gauge("unlearnd_rebase_running", "1 while a rebase of the model trains or finishes",
                                    ["model"], registry=r)
        self.rebase_started = Gauge("unlearnd_rebase_started_timestamp_seconds",
                                    "When the running rebase of the model started (0: none runs)", ["model"],
                                    registry=r)
        for ref in ("current", "original"):
            self.probe_accuracy.labels(reference=ref)
        for ref in ("original", "previous"):
            self.param_drift.labels(reference=ref)
            self.flip_ratio.labels(reference=ref)
        for outcome in ("applied", "failed", "aborted", "deferred"):
            self.rounds.labels(outcome=outcome)

    def export_round(self, model: str, version: int, m: RoundMetrics) -> None:
        """The gauges of an applied round (its version is published)."""
        self.model_version.labels(model=model).set(version)
        self.forget_accuracy.set(m.forget_accuracy)
        self.probe_accuracy.labels(reference="current").set(m.probe_accuracy_after)
        self.probe_accuracy.labels(reference="original").set(m.probe_accuracy_original)
        self.param_drift.labels(reference="original").set(m.param_drift_l2_original)
        self.param_drift.labels(reference="previous").set(m.param_drift_l2_previous)
        self.flip_ratio.labels(reference="original").set(m.prediction_flip_ratio_original)
        self.flip_ratio.labels(reference="previous").set(m.prediction_flip_ratio_previous)
        self.importance_density.set(m.importance_density_ratio)

    def export_membership(self, model: str, evidence: MembershipEvidence | None) -> None:
        """An applied round's membership evidence (forget rounds; others have none and change nothing here)."""
        if evidence is None:
            return
        if model not in self._membership_models:      # every verdict reads 0 from the first round, not absent
            self._membership_models.add(model)
            for v in VERDICTS:
                self.membership_verdicts.labels(model=model, verdict=v)
        self.membership_auc.labels(model=model).set(evidence.auc)
        self.membership_verdicts.labels(model=model, verdict=evidence.verdict).inc()

    def export_memory_fill(self, model: str, fill: Mapping[str, float]) -> None:
        """Per layer fill and its summary. A layer exported before and absent now reads 0: its memory was
        emptied (a rebase or a rollback to before the layer's first round), not left at its old value."""
        seen = self._fill_layers.setdefault(model, set())
        for layer in seen - set(fill):
            self.memory_fill.labels(model=model, layer=layer).set(0.0)
        for layer, share in fill.items():
            self.memory_fill.labels(model=model, layer=layer).set(share)
        seen.update(fill)
        self.memory_free.labels(model=model).set(memory_free_share(fill))

    def export_capacity(self, model: str, *, headroom: float, floor: float, deletions: int) -> None:
        """The remaining-capacity gauges of a model's live version (start-up, each applied round, each reload)."""
        self.headroom.labels(model=model).set(headroom)
        self.gate_floor.labels(model=model).set(floor)
        self.deletions_since_base.labels(model=model).set(deletions)

    def serve(self, host: str, port: int, *, tls: TlsFiles | None = None, token: str | None = None):  # noqa: ANN201
        """Start /metrics on a background thread, over TLS with ``tls`` and behind ``token`` when given;
        (server, thread) as prometheus-client's ``start_http_server`` (``daemon.pipeline.metrics_http``)."""
        return start_metrics_server(self.registry, host, port, tls=tls, token=token)


def memory_free_share(fill: Mapping[str, float]) -> float:
    """The largest free share over the memory's layers: 1 - the least-filled layer's fill.

    Why the largest and not the smallest: an instance round moves every layer that still has room, so the
    model can go on forgetting until *every* protected layer is full. The smallest would sit at 0 from the
    first round on any model with a narrow layer (mnist_cnn's convolutions fill at once, a ViT's token layers
    in one round of 32) and say nothing. With no layer protected yet (before the first round, or
    with the memory off) nothing limits the rounds: 1.
    """
    return max((1.0 - share for share in fill.values()), default=1.0)
