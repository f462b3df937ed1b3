"""The daemon benchmark (issue 5): time to forget, intake of bad/duplicate floods, resident memory.

Runs the real daemon (``python -m daemon.cli run``) against the embedded Tansu broker, through the
test harness (tests/pipeline_harness.py), on a real MNIST model (pretrained once, 6 epochs, cached under
var/bench-cache/daemon-registry). Three phases:

1. forget: 32 single-instance forget requests published at once to a daemon with the default
   configuration ([rounds] max_instances 64, max_wait_s 2.0, retention gate 0.02, preset default).
   ``all_applied_s``: from the first send to the moment a consumer of unlearn.receipts holds the last
   ``applied`` receipt; p50/p99 from the receipts' ``timings.time_to_forget_s``.
2. intake: the daemon is stopped; 20,000 messages are published (5,000 not JSON, 5,000 schema errors,
   10,000 replays of a request that phase 1 applied); the daemon is started again on the same state and
   drains the backlog. The rate is taken from the daemon's own Prometheus counters, sampled every 50 ms:
   from the last sample before ``unlearnd_intake_messages_total`` moved to the first sample where the
   messages handled (``unlearnd_dlq_total`` + ``unlearnd_requests_total{status="duplicate"}``, both
   incremented after the ledger transaction that records the effect) reach 20,000. Cross-checked with
   the timestamps of the daemon's per-poll ``intake_batch`` log lines.
3. rss: a fresh daemon; one 4-instance forget request at a time, waiting for its receipt, so each round
   is its own commit; VmRSS of the daemon process (/proc/<pid>/status) is read after each
   ``round_committed`` log event. The first rounds are warm-up; the spread is taken against the first
   round after them.

Writes benchmarks/results/daemon.json, daemon.md and daemon_rss.png. Run from the repository root:
``.venv/bin/python benchmarks/daemon_bench.py`` (or ``make bench-daemon``). ``--only intake`` runs
section 2 alone (after a one-request section 1) and prints it, leaving benchmarks/results alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tests.pipeline_harness import (  # noqa: E402
    Broker,
    DaemonProcess,
    copy_registry,
    free_port,
    read_topic,
    request,
)

MODEL = "mnist-cnn"
CACHE = ROOT / "var" / "bench-cache" / "daemon-registry"
WORK = ROOT / "var" / "bench-daemon"
RESULTS = ROOT / "benchmarks" / "results"
PRETRAIN_EPOCHS = 6

N_FORGET = 32
N_NOT_JSON = 5000
N_SCHEMA = 5000
N_REPLAY = 10000
RSS_WARMUP = 2
RSS_ROUNDS = 20            # measured rounds after the warm-up
RSS_INSTANCES = 4

BAR_ALL_APPLIED_S = 30.0
BAR_INTAKE = 5000.0
BAR_RSS_SPREAD = 0.10
OPEN_GATE = 1.0            # supplementary runs: the retention gate opened so that every round commits


# -- helpers -------------------------------------------------------------------------------------------
def _machine() -> dict[str, object]:
    """The project's machine record (daemon.bench.runner), with the ``cores`` key these results use."""
    from daemon.bench.runner import machine_info

    return {**machine_info("cpu"), "cores": os.cpu_count()}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def write_config(path: Path, *, bootstrap: str, registry_dir: Path, state_dir: Path, metrics_port: int,
                 gate: float | None = None) -> Path:
    """The defaults a user would run: only where things live is set ([rounds] is all defaults unless
    ``gate`` overrides the retention gate, for the supplementary runs)."""
    rounds = "" if gate is None else f"[rounds]\nretention_max_drop = {gate}\n"
    path.write_text(f"""
[kafka]
bootstrap = "{bootstrap}"
[state]
dir = "{state_dir}"
[registry]
dir = "{registry_dir}"
[metrics]
port = {metrics_port}
{rounds}
[[models]]
name = "{MODEL}"
dataset = "mnist"
""")
    return path


def ensure_model() -> Path:
    if not (CACHE / MODEL / "LATEST").exists():
        print(f"pretraining {MODEL} ({PRETRAIN_EPOCHS} epochs) into {CACHE} ...", flush=True)
        shutil.rmtree(CACHE, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "daemon.cli", "pretrain", "--registry", str(CACHE), "--model", MODEL,
                        "--epochs", str(PRETRAIN_EPOCHS)], cwd=ROOT, check=True)
    return CACHE


def make_producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=[bootstrap], acks="all", linger_ms=5, batch_size=256 << 10,
                         max_request_size=4 << 20, max_block_ms=20000)


def body_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


class ReceiptWatcher:
    """Follows unlearn.receipts on a thread; remembers when each receipt arrived here (monotonic)."""

    def __init__(self, bootstrap: str, topic: str = "unlearn.receipts") -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=[bootstrap], enable_auto_commit=False,
                                      auto_offset_reset="earliest", group_id=None,
                                      client_id=f"bench-{uuid.uuid4().hex[:6]}")
        parts: set[int] = set()
        deadline = time.monotonic() + 30
        while not parts and time.monotonic() < deadline:
            parts = self.consumer.partitions_for_topic(topic) or set()
            time.sleep(0.1)
        if not parts:
            raise RuntimeError(f"topic {topic} does not exist")
        self.consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        self.received: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batches = self.consumer.poll(timeout_ms=50)
            now = time.monotonic()
            with self._lock:
                for recs in batches.values():
                    for rec in recs:
                        self.received.append((now, json.loads(rec.value)))

    def outcomes(self, prefix: str) -> dict[str, tuple[float, dict[str, Any]]]:
        """First non-duplicate receipt per request id starting with prefix, with its arrival time."""
        out: dict[str, tuple[float, dict[str, Any]]] = {}
        with self._lock:
            for t, r in self.received:
                rid = r.get("request_id") or ""
                if rid.startswith(prefix) and r.get("status") != "duplicate" and rid not in out:
                    out[rid] = (t, r)
        return out

    def wait(self, prefix: str, count: int, timeout: float) -> dict[str, tuple[float, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.outcomes(prefix)
            if len(got) >= count:
                return got
            time.sleep(0.02)
        return self.outcomes(prefix)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.consumer.close()


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    v = {"intake": 0.0, "dlq": 0.0, "duplicate": 0.0, "rejected": 0.0, "outbox": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "unlearnd_intake_messages_total":
                v["intake"] += s.value
            elif s.name == "unlearnd_dlq_total":
                v["dlq"] += s.value
            elif s.name == "unlearnd_requests_total" and s.labels.get("status") in ("duplicate", "rejected"):
                v[s.labels["status"]] += s.value
            elif s.name == "unlearnd_outbox_records":
                v["outbox"] = s.value
    return v


def vmrss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def log_ts(e: dict[str, Any]) -> float:
    return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def start_daemon(cfg: Path, log: Path, threads_env: str) -> DaemonProcess:
    # DaemonProcess pins OMP_NUM_THREADS=1 for the test suite; a user's environment has no such pin, so the
    # torch default (one thread per core) is restored here.
    return DaemonProcess(cfg, log, env={"OMP_NUM_THREADS": threads_env}).start()


# -- phase 1: 32 forget requests at once -----------------------------------------------------------------
def phase_forget(broker: Broker, base: Path, cache: Path, threads_env: str, gate: float | None,
                 n_forget: int = N_FORGET) -> dict[str, Any]:
    reg = copy_registry(cache, base / "registry")
    port = free_port()
    cfg = write_config(base / "unlearnd.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                       state_dir=base / "state", metrics_port=port, gate=gate)
    d = start_daemon(cfg, base / "daemon-forget.log", threads_env)
    try:
        t_start = time.monotonic()
        d.wait_assigned(timeout=120)
        startup_s = time.monotonic() - t_start
        watcher = ReceiptWatcher(broker.bootstrap)
        bodies = [request(f"bench-f-{i}", "forget", [f"mnist-train:{i}"]) for i in range(n_forget)]
        producer = make_producer(broker.bootstrap)
        producer.partitions_for("unlearn.requests")   # metadata fetched before the clock starts
        t0 = time.monotonic()
        for b in bodies:
            producer.send("unlearn.requests", key=MODEL.encode(), value=body_bytes(b))
        producer.flush(timeout=30)
        publish_s = time.monotonic() - t0
        producer.close(timeout=5)
        got = watcher.wait("bench-f-", n_forget, timeout=300)
        watcher.close()
    except BaseException:
        d.kill()
        raise
    statuses: dict[str, int] = {}
    for _, r in got.values():
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    applied = [(t, r) for t, r in got.values() if r["status"] == "applied"]
    ttf = [float(r["timings"]["time_to_forget_s"]) for _, r in applied]
    # a failed receipt has no time_to_forget_s (nothing was forgotten): its latency is received -> failed
    failed_latency = [round(log_ts({"timestamp": r["timings"]["failed_at"]}) -
                            log_ts({"timestamp": r["timings"]["received_at"]}), 3)
                      for _, r in got.values() if r["status"] == "failed"]
    last_outcome = max((t for t, _ in got.values()), default=None)
    all_applied = len(applied) == n_forget
    rounds = sorted({r.get("round_id") for _, r in got.values() if r.get("round_id")})
    round_events = [e for e in d.events() if e.get("event") in ("round_started", "round_committed", "round_failed")]
    reasons = sorted({r.get("reason") for _, r in got.values() if r.get("reason")})
    first = applied[0][1] if applied else None
    return {
        "time_to_forget_s": {
            "n": len(ttf), "p50": pct(ttf, 50), "p99": pct(ttf, 99),
            # null unless every request was applied: a failed request was not forgotten
            "all_applied_s": round(last_outcome - t0, 3) if all_applied and last_outcome else None,
        },
        "detail": {
            "retention_max_drop": gate, "requests": n_forget, "instances_per_request": 1, "statuses": statuses,
            "outcome_receipts": len(got), "failure_reasons": reasons,
            "last_outcome_receipt_s": round(last_outcome - t0, 3) if last_outcome else None,
            "failed_received_to_failed_s": {"p50": pct(failed_latency, 50), "max": max(failed_latency)}
            if failed_latency else None,
            "publish_s": round(publish_s, 3), "daemon_startup_to_assigned_s": round(startup_s, 2),
            "rounds": rounds,
            "round_log": [{k: e.get(k) for k in ("event", "round_id", "requests", "instances", "steps",
                                                 "forget_accuracy", "probe_accuracy", "reason", "timestamp")
                           if k in e} for e in round_events],
            "time_to_forget_values_s": sorted(ttf),
            "ttf_min_s": min(ttf) if ttf else None, "ttf_max_s": max(ttf) if ttf else None,
            "probe_accuracy_before": first["metrics"].get("probe_accuracy_before") if first else None,
            "probe_accuracy_after": first["metrics"].get("probe_accuracy_after") if first else None,
            "forget_accuracy": first["metrics"].get("forget_accuracy") if first else None,
        },
        "_daemon": d, "_port": port, "_bodies": bodies, "_reg": reg, "_state": base / "state",
        "_by_id": {rid: r["status"] for rid, (_, r) in got.items()},
    }


# -- phase 2: intake of a backlog of bad and duplicate messages ------------------------------------------
def flood_messages(replay: dict[str, Any]) -> list[tuple[bytes, bytes, str]]:
    replay_bytes = body_bytes(replay)
    key = MODEL.encode()
    out: list[tuple[bytes, bytes, str]] = []
    for i in range(max(N_NOT_JSON, N_SCHEMA, N_REPLAY)):
        if i < N_NOT_JSON:     # truncated JSON
            out.append((key, f'{{"schema": "unlearn.request/v1", "request_id": "bench-nj-{i}", "model": "m'
                        .encode(), "not_json"))
        if i < N_SCHEMA:       # valid JSON, a kind the schema does not have
            bad = request(f"bench-sc-{i}", "forget", [f"mnist-train:{i}"])
            bad["kind"] = "forgett"
            out.append((key, body_bytes(bad), "schema"))
        if i < N_REPLAY:       # byte-identical replay of an applied request
            out.append((key, replay_bytes, "replay"))
    return out


def phase_intake(broker: Broker, base: Path, forget: dict[str, Any], threads_env: str) -> dict[str, Any]:
    d: DaemonProcess = forget["_daemon"]
    rc = d.terminate(timeout=60)
    replay = forget["_bodies"][0]
    msgs = flood_messages(replay)
    n = len(msgs)
    producer = make_producer(broker.bootstrap)
    t0 = time.monotonic()
    for key, value, _ in msgs:
        producer.send("unlearn.requests", key=key, value=value)
    producer.flush(timeout=120)
    publish_s = time.monotonic() - t0
    producer.close(timeout=5)

    # restarted on the same ledger and registry, with the default configuration (the gate plays no part here)
    port = free_port()
    cfg = write_config(base / "unlearnd-intake.toml", bootstrap=broker.bootstrap, registry_dir=forget["_reg"],
                       state_dir=forget["_state"], metrics_port=port)
    samples: list[tuple[float, dict[str, float]]] = []
    d2 = start_daemon(cfg, base / "daemon-intake.log", threads_env)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                v = scrape(port)
            except OSError:
                time.sleep(0.05)
                continue
            samples.append((time.monotonic(), v))
            if v["dlq"] + v["duplicate"] >= n and v["outbox"] == 0 and len(samples) > 1:
                break
            if d2.proc is not None and d2.proc.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{d2.tail()}")
            time.sleep(0.05)
        handled = [s[1]["dlq"] + s[1]["duplicate"] for s in samples]
        first = next(i for i, s in enumerate(samples) if s[1]["intake"] > 0)
        t_before = samples[first - 1][0] if first > 0 else samples[first][0]
        done = next((i for i, h in enumerate(handled) if h >= n), None)
        t_done = samples[done][0] if done is not None else None
        rate = n / (t_done - t_before) if t_done else None
        drained = next((s[0] for s in samples[done or 0:] if s[1]["outbox"] == 0), None) if done is not None else None
        # upper estimate: from the first sample that saw the intake move to the last one before all were handled
        last_short = max(i for i, h in enumerate(handled) if h < n) if done is not None else None
        # log cross-check: one `intake_batch` line per poll (after its transaction), timestamped by the daemon;
        # the first poll's messages are not counted, its line's time is where the count starts
        handled_events = [e for e in d2.events() if e.get("event") == "intake_batch"]
        log_rate = None
        if len(handled_events) >= 2:
            ts = [log_ts(e) for e in handled_events]
            later = sum(int(e.get("messages", 0)) for e in handled_events[1:])
            log_rate = later / (max(ts) - min(ts)) if max(ts) > min(ts) else None
        final = samples[-1][1]
        rss_after = vmrss_mb(d2.proc.pid) if d2.proc is not None else None
    finally:
        rc2 = d2.terminate(timeout=60)
    # what reached the broker: DLQ rows and duplicate receipts (a fresh consumer reads the topics back)
    dlq = read_topic(broker.bootstrap, "unlearn.dlq", timeout=60, until=lambda rs: len(rs) >= N_NOT_JSON + N_SCHEMA)
    recs = read_topic(broker.bootstrap, "unlearn.receipts", timeout=60,
                      until=lambda rs: len(rs) >= len(forget["_bodies"]) + N_REPLAY + N_SCHEMA)
    receipt_status: dict[str, int] = {}
    for rec in recs:
        r = json.loads(rec.value)
        receipt_status[r["status"]] = receipt_status.get(r["status"], 0) + 1
    return {
        "intake_msgs_per_s": round(rate, 1) if rate else None,
        "detail": {
            "messages": n, "not_json": N_NOT_JSON, "schema_errors": N_SCHEMA, "replays_of_applied": N_REPLAY,
            "replayed_request_id": replay["request_id"], "replayed_request_status": forget["_replay_status"],
            "publish_s": round(publish_s, 2),
            "method": "backlog drain: daemon stopped, messages published, daemon restarted on the same state; "
                      "Prometheus /metrics sampled every 50 ms; rate = messages / (last sample before "
                      "unlearnd_intake_messages_total moved -> first sample with unlearnd_dlq_total + "
                      "unlearnd_requests_total{status=duplicate} = messages)",
            "window_s": round(t_done - t_before, 3) if t_done else None,
            "upper_estimate_msgs_per_s": (round(n / (samples[last_short][0] - samples[first][0]), 1)
                                          if last_short is not None and samples[last_short][0] > samples[first][0]
                                          else None),
            "log_timestamps_msgs_per_s": round(log_rate, 1) if log_rate else None,
            "log_intake_batches": len(handled_events),
            "log_messages_handled": sum(int(e.get("messages", 0)) for e in handled_events),
            "outbox_drained_s": round(drained - t_before, 2) if drained else None,
            "metrics_final": final,
            "scrape_samples": len(samples),
            "dlq_rows_on_broker": len(dlq),
            "receipts_on_broker_by_status": receipt_status,
            "daemon_rss_after_mb": round(rss_after, 1) if rss_after else None,
            "exit_codes": [rc, rc2],
        },
    }


# -- phase 3: resident memory over rounds ----------------------------------------------------------------
def phase_rss(broker: Broker, base: Path, cache: Path, threads_env: str, gate: float | None) -> dict[str, Any]:
    reg = copy_registry(cache, base / "registry")
    cfg = write_config(base / "unlearnd.toml", bootstrap=broker.bootstrap, registry_dir=reg,
                       state_dir=base / "state", metrics_port=free_port(), gate=gate)
    d = start_daemon(cfg, base / "daemon-rss.log", threads_env)
    rss: list[float] = []
    outcome: list[str] = []
    probe: list[float | None] = []
    round_s: list[float] = []
    failed: list[dict[str, Any]] = []
    statuses: dict[str, int] = {}
    rss_at_start = None
    want = RSS_WARMUP + RSS_ROUNDS
    try:
        d.wait_assigned(timeout=120)
        rss_at_start = vmrss_mb(d.proc.pid)
        watcher = ReceiptWatcher(broker.bootstrap)
        producer = make_producer(broker.bootstrap)
        seen = len(d.events())
        for i in range(want):
            refs = [f"mnist-train:{1000 + RSS_INSTANCES * i + k}" for k in range(RSS_INSTANCES)]
            body = request(f"bench-rss-{i}", "forget", refs)
            t0 = time.monotonic()
            producer.send("unlearn.requests", key=MODEL.encode(), value=body_bytes(body))
            producer.flush(timeout=30)
            # the round's end: round_committed, or round_failed when the gate (or the engine) refused it
            e = d.wait_for(lambda e: e.get("event") in ("round_committed", "round_failed"), timeout=180, after=seen)
            rss.append(round(vmrss_mb(d.proc.pid), 2))
            outcome.append("committed" if e["event"] == "round_committed" else "failed")
            got = watcher.wait(f"bench-rss-{i}", 1, timeout=60)
            round_s.append(round(time.monotonic() - t0, 2))
            for _, r in got.values():
                statuses[r["status"]] = statuses.get(r["status"], 0) + 1
                probe.append((r.get("metrics") or {}).get("probe_accuracy_after"))
                if r["status"] == "failed":
                    failed.append({"round": i + 1, "reason": r.get("reason")})
            seen = len(d.events())
        producer.close(timeout=5)
        watcher.close()
    finally:
        rc = d.terminate(timeout=60)
    post = rss[RSS_WARMUP:]
    ref = post[0] if post else None
    return {
        "rss_mb": rss,
        "detail": {
            "retention_max_drop": gate,
            "warmup_rounds": RSS_WARMUP, "measured_rounds": len(post), "instances_per_round": RSS_INSTANCES,
            "round_outcomes": outcome, "committed_rounds": outcome.count("committed"), "statuses": statuses,
            "failed": failed, "probe_accuracy_after_applied": probe,
            "rss_at_start_mb": round(rss_at_start, 2) if rss_at_start else None,
            "reference_mb": ref,
            "min_mb": min(post) if post else None, "max_mb": max(post) if post else None,
            "spread_rel": round((max(post) - min(post)) / ref, 4) if post else None,
            "max_dev_rel": round(max(abs(v - ref) for v in post) / ref, 4) if post else None,
            "max_above_rel": round((max(post) - ref) / ref, 4) if post else None,
            "max_below_rel": round((min(post) - ref) / ref, 4) if post else None,
            "publish_to_receipt_s": round_s, "exit_code": rc,
        },
    }


# -- outputs --------------------------------------------------------------------------------------------
def rss_ok(r: dict[str, Any]) -> bool:
    return r["max_dev_rel"] is not None and r["max_dev_rel"] <= BAR_RSS_SPREAD and r["measured_rounds"] >= 20


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    s = result["settings"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    series = [("default gate (0.02)", result["rss_mb"], s["rss"], "tab:blue"),
              (f"gate {s['rss_every_round_commits']['retention_max_drop']} (every round commits)",
               s["rss_every_round_commits"]["rss_mb"], s["rss_every_round_commits"], "tab:purple")]
    warm = s["rss"]["warmup_rounds"]
    if warm:
        a.axvspan(0.5, warm + 0.5, color="0.88", label="warm-up")
    allv: list[float] = []
    for label, values, det, color in series:
        x = list(range(1, len(values) + 1))
        ref = det["reference_mb"]
        if ref:
            a.axhspan(ref * (1 - BAR_RSS_SPREAD), ref * (1 + BAR_RSS_SPREAD), color=color, alpha=0.07)
            for k in (1 - BAR_RSS_SPREAD, 1 + BAR_RSS_SPREAD):
                a.axhline(ref * k, color=color, lw=0.6, ls="--")
            allv += [ref * (1 - BAR_RSS_SPREAD), ref * (1 + BAR_RSS_SPREAD)]
        a.plot(x, values, "-", color=color, lw=1.2, label=f"{label}; dashed: ±{BAR_RSS_SPREAD:.0%} of round {warm + 1}")
        com = [(xi, v) for xi, v, o in zip(x, values, det["round_outcomes"], strict=True) if o == "committed"]
        fail = [(xi, v) for xi, v, o in zip(x, values, det["round_outcomes"], strict=True) if o != "committed"]
        if com:
            a.plot(*zip(*com), "o", color=color, ms=4)
        if fail:
            a.plot(*zip(*fail), "x", color=color, ms=6)
        allv += values
    a.plot([], [], "ko", ms=4, label="round committed")
    a.plot([], [], "kx", ms=6, label="round failed (gate)")
    a.set_xlabel(f"round (one {RSS_INSTANCES}-instance forget request each)")
    a.set_ylabel("daemon VmRSS after the round (MB)")
    a.set_title("Daemon resident memory per round")
    n = max(len(v) for _, v, _, _ in series)
    a.set_xlim(0.5, n + 0.5)
    a.set_ylim(min(allv) * 0.97, max(allv) * 1.03)
    a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a.legend(loc="lower right", fontsize=7)

    f, w = s["forget"], s["forget_every_round_commits"]
    ttf = w["time_to_forget_values_s"]
    bins = np.arange(0, BAR_ALL_APPLIED_S * 1.1 + 0.5, 0.5)
    if ttf:
        b.hist(ttf, bins=bins, color="tab:orange",
               label=f"gate {w['retention_max_drop']}: applied receipts' time_to_forget_s (n={len(ttf)})")
    if w["time_to_forget"]["all_applied_s"] is not None:
        b.axvline(w["time_to_forget"]["all_applied_s"], color="tab:orange", ls="-.",
                  label=f"gate {w['retention_max_drop']}: last applied receipt read")
    if f["last_outcome_receipt_s"] is not None:
        what = ", ".join(f"{v} {k}" for k, v in sorted(f["statuses"].items()))
        b.axvline(f["last_outcome_receipt_s"], color="tab:blue", ls=":",
                  label=f"default gate: last outcome receipt read ({what})")
    b.axvline(BAR_ALL_APPLIED_S, color="tab:red", ls="--", label=f"bar: all applied <= {BAR_ALL_APPLIED_S:g} s")
    b.set_xlim(0, BAR_ALL_APPLIED_S * 1.1)
    b.legend(fontsize=7, loc="upper left")
    b.set_ylim(0, max(N_FORGET * 1.35, 1))
    b.set_xlabel("seconds")
    b.set_ylabel("requests")
    b.set_title(f"{N_FORGET} single-instance forget requests at once")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _round_log(f: dict[str, Any]) -> str:
    out = []
    for e in f["round_log"]:
        if e["event"] == "round_started":
            out.append(f"{e['round_id']} started ({e.get('requests')} requests, {e.get('instances')} instances)")
        elif e["event"] == "round_committed":
            out.append(f"committed (steps {e.get('steps')}, forget accuracy {e.get('forget_accuracy')}, probe "
                       f"accuracy {e.get('probe_accuracy'):.4f})")
        else:
            out.append(f"failed ({e.get('reason')})")
    return "; ".join(out)


def _r4(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _largest_step(values: list[float], warm: int) -> str:
    post = values[warm:]
    if len(post) < 2:
        return "n/a"
    k = max(range(1, len(post)), key=lambda j: abs(post[j] - post[j - 1]))
    return f"{post[k] - post[k - 1]:+.1f} MB into round {warm + k + 1}"


def report(result: dict[str, Any]) -> str:
    t = result["time_to_forget_s"]
    s = result["settings"]
    f, w, i, r, r2 = s["forget"], s["forget_every_round_commits"], s["intake"], s["rss"], s["rss_every_round_commits"]
    m, c = result["machine"], s["config"]
    wt = w["time_to_forget"]

    def met(ok: bool | None) -> str:
        return "**met**" if ok else "**not met**"

    aa = t["all_applied_s"]
    ok1 = aa is not None and aa <= BAR_ALL_APPLIED_S
    rate = result["intake_msgs_per_s"]
    ok2 = rate is not None and rate >= BAR_INTAKE
    if aa is not None:
        m1 = f"all {t['n']} applied in {aa:.2f} s (time_to_forget p50 {t['p50']} s, p99 {t['p99']} s)"
    else:
        m1 = (f"{t['n']} of {N_FORGET} applied: outcomes {f['statuses']}, the last outcome receipt "
              f"{f['last_outcome_receipt_s']} s after the first send")
    lines = [
        "# Daemon benchmark (issue 5)",
        "",
        f"Generated by `benchmarks/daemon_bench.py` (`make bench-daemon`), {s['date']}, {s['total_wall_s']:.0f} s "
        f"in all. Raw numbers: `daemon.json`; plot: `daemon_rss.png`.",
        "",
        "## Bars",
        "",
        "Measured with the daemon's default configuration (retention gate 0.02, preset default, "
        "max_instances 64, max_wait_s 2.0).",
        "",
        "| bar | measured | target | verdict |",
        "| --- | --- | --- | --- |",
        f"| {N_FORGET} single-instance forget requests published at once: all applied | {m1} | "
        f"<= {BAR_ALL_APPLIED_S:g} s | {met(ok1)} |",
        (f"| intake of invalid / duplicate messages | {rate:,.0f} msg/s ({i['messages']:,} messages handled in "
         f"{i['window_s']} s) | >= {BAR_INTAKE:,.0f} msg/s | {met(ok2)} |") if rate else
        f"| intake of invalid / duplicate messages | not measured | >= {BAR_INTAKE:,.0f} msg/s | {met(False)} |",
        f"| resident memory flat over {r['measured_rounds']} rounds (after {r['warmup_rounds']} warm-up) | "
        f"{r['min_mb']:.1f} - {r['max_mb']:.1f} MB; largest deviation from round {r['warmup_rounds'] + 1} "
        f"({r['reference_mb']:.1f} MB) {r['max_dev_rel']:.1%}; {r['committed_rounds']} of {len(result['rss_mb'])} "
        f"rounds committed, the others failed the gate | ±{BAR_RSS_SPREAD:.0%} | {met(rss_ok(r))} |",
        "",
        "Supplementary runs with the retention gate opened (`retention_max_drop = "
        f"{w['retention_max_drop']}`), so that every round commits; they show the cost of the apply path, not "
        "a configuration to run:",
        "",
        "| run | measured | target | within it? |",
        "| --- | --- | --- | --- |",
        f"| {N_FORGET} at once, gate {w['retention_max_drop']} | "
        + (f"all {wt['n']} applied in {wt['all_applied_s']:.2f} s (time_to_forget p50 {wt['p50']} s, p99 "
           f"{wt['p99']} s)" if wt["all_applied_s"] is not None else
           f"{wt['n']} applied, outcomes {w['statuses']}")
        + f" | <= {BAR_ALL_APPLIED_S:g} s | "
        + ("yes" if wt["all_applied_s"] is not None and wt["all_applied_s"] <= BAR_ALL_APPLIED_S else "no") + " |",
        f"| RSS over {r2['measured_rounds']} rounds, gate {r2['retention_max_drop']} ({r2['committed_rounds']} of "
        f"{len(r2['rss_mb'])} committed) | {r2['min_mb']:.1f} - {r2['max_mb']:.1f} MB; largest deviation from round "
        f"{r2['warmup_rounds'] + 1} ({r2['reference_mb']:.1f} MB) {r2['max_dev_rel']:.1%} | ±{BAR_RSS_SPREAD:.0%} | "
        + ("yes" if rss_ok(r2) else "no") + " |",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}. Load average "
        f"(1/5/15 min) before: {s['loadavg_before']}, after: {s['loadavg_after']}. The two cores are shared with "
        "other work on this machine; the load after includes this benchmark's own daemon and broker.",
        "",
        "## Set-up",
        "",
        f"- Model: `{MODEL}` (mnist_cnn), pretrained once for {PRETRAIN_EPOCHS} epochs on MNIST "
        f"(`unlearnd pretrain`, cached in `var/bench-cache/daemon-registry`), copied into a fresh registry per "
        f"phase.",
        "- Broker: the embedded Tansu broker (in-memory) on 127.0.0.1, a fresh one per phase group; daemon: "
        "`python -m daemon.cli run --config ...` as a subprocess (tests/pipeline_harness.py's DaemonProcess), "
        "JSON logs to a file.",
        f"- Daemon configuration: the file sets only bootstrap, state dir, registry dir and metrics port "
        f"(plus the gate in the supplementary runs); the rest are the embedded defaults: [rounds] max_instances "
        f"{c['max_instances']}, max_wait_s {c['max_wait_s']}, method {c['method']}, preset {c['preset']}, "
        f"accumulation {c['accumulation']}, retention gate {c['retention_max_drop']} on probe `{c['probe']}`, "
        f"threads {c['threads']} (torch's default); kafka poll_timeout_ms {c['poll_timeout_ms']}, "
        f"max_poll_records {c['max_poll_records']}; daemon outbox_interval_s {c['outbox_interval_s']}. The "
        f"harness pins OMP_NUM_THREADS=1 for the test suite; the benchmark sets OMP_NUM_THREADS="
        f"{s['omp_num_threads']} (the core count, what torch uses when nothing is set), so the daemon runs as a "
        "user would run it.",
        "",
        f"## 1. Time to forget ({N_FORGET} requests at once)",
        "",
        f"{N_FORGET} requests `bench-f-0..{N_FORGET - 1}`, each one `forget` instance (`mnist-train:0` ... "
        f"`mnist-train:{N_FORGET - 1}`), sent by one producer in {f['publish_s']} s once the daemon held its "
        "partitions. `all_applied_s` runs from the first send to the moment a consumer of `unlearn.receipts` "
        "(subscribed before the send, on this machine) holds the last `applied` receipt: it includes the "
        "batching wait (max_wait_s), the round, the retention check, the durable commit and the outbox publish. "
        "p50/p99 are over the `applied` receipts' `timings.time_to_forget_s` (daemon intake to durable commit). "
        "`all_applied_s` is null when not every request was applied: a `failed` request was not forgotten.",
        "",
        f"- default gate: outcomes {f['statuses']}; {_round_log(f)}",
        f"- the last outcome receipt arrived {f['last_outcome_receipt_s']} s after the first send"
        + (f"; failed receipts' received -> failed: p50 {f['failed_received_to_failed_s']['p50']} s, max "
           f"{f['failed_received_to_failed_s']['max']} s" if f["failed_received_to_failed_s"] else ""),
        f"- gate {w['retention_max_drop']} (supplementary): outcomes {w['statuses']}; {_round_log(w)}",
        f"- gate {w['retention_max_drop']}: time_to_forget_s min {w['ttf_min_s']}, p50 {wt['p50']}, p99 {wt['p99']}, "
        f"max {w['ttf_max_s']}; all applied {wt['all_applied_s']} s after the first send; probe accuracy "
        f"{_r4(w['probe_accuracy_before'])} -> {_r4(w['probe_accuracy_after'])}, forget accuracy "
        f"{_r4(w['forget_accuracy'])}",
        "",
        "## 2. Intake of invalid and duplicate messages",
        "",
        f"{i['messages']:,} messages on `unlearn.requests` (key `{MODEL}`), interleaved: {i['not_json']:,} "
        f"truncated JSON (`not_json`: a DLQ row each), {i['schema_errors']:,} valid JSON with an unknown kind "
        f"(`bad_kind`: a DLQ row and a `rejected` receipt each), {i['replays_of_applied']:,} byte-identical "
        f"replays of `{i['replayed_request_id']}` (status `{i['replayed_request_status']}` in the ledger, from "
        f"the gate-{w['retention_max_drop']} run of section 1): a `duplicate` receipt each.",
        "",
        "Method: the daemon of section 1 is stopped (SIGTERM), the messages are published "
        f"({i['publish_s']} s with kafka-python), and the daemon is started again, with the default "
        "configuration, on the same ledger and registry; it drains the backlog. Publishing first keeps the "
        "producer (which would share the two cores) out of the measurement: this measures what the daemon can "
        "take, not what one producer can send. From the daemon's point of view: its Prometheus endpoint is "
        "scraped every 50 ms; the window runs from the last sample before `unlearnd_intake_messages_total` "
        "moved (the first poll) to the first sample in which the messages handled, `unlearnd_dlq_total` + "
        "`unlearnd_requests_total{status=\"duplicate\"}` (both incremented only after the ledger transaction "
        f"that records the messages' effects has committed), reach {i['messages']:,}. Sampling makes the window "
        "up to ~100 ms too long, so the rate is a lower bound.",
        "",
        (f"- rate: **{rate:,.0f} msg/s** over {i['window_s']} s" if rate else "- rate: not measured"),
        f"- cross-checks: the daemon's own log timestamps (one `intake_batch` line per poll, written after its "
        f"transaction: {i['log_intake_batches']} lines for {i['log_messages_handled']:,} messages; the messages "
        f"after the first line over first to last line): {i['log_timestamps_msgs_per_s']} msg/s; "
        f"upper estimate from the samples (first sample that saw the intake move to the last one short of "
        f"{i['messages']:,}): {i['upper_estimate_msgs_per_s']} msg/s",
        f"- the receipts and DLQ copies leave through the outbox (own thread, acks=all): outbox empty "
        f"{i['outbox_drained_s']} s after the window's start",
        f"- read back from the broker afterwards: {i['dlq_rows_on_broker']:,} DLQ rows; receipts by status "
        f"{i['receipts_on_broker_by_status']} (including section 1's {w['requests']} outcome receipts)",
        "",
        "## 3. Resident memory over rounds",
        "",
        f"A fresh daemon (own registry copy and ledger). {len(result['rss_mb'])} requests, one at a time: each a "
        f"`forget` of {r['instances_per_round']} distinct `mnist-train` refs (1000 onwards), the next published "
        "only once the previous one's receipt arrived, so every request is a round of its own and, when it passes the gate, a commit of its own (each first waits "
        f"max_wait_s = {c['max_wait_s']} s, as the defaults do). VmRSS of the daemon process "
        "(`/proc/<pid>/status`) is read as soon as the round's end appears in the log: `round_committed`, or "
        "`round_failed` when the gate refused the round (a failed round runs the whole computation and the "
        "retention check, but writes no version). With the default gate most rounds fail (the retention budget "
        "of 0.02 is spent by the first committed rounds), so there are not 20 `round_committed` events to "
        "sample; the supplementary run with the gate opened commits every round and samples after each "
        f"`round_committed`. The first {r['warmup_rounds']} rounds are warm-up (allocator and torch caches "
        f"filling); the reference is round {r['warmup_rounds'] + 1}.",
        "",
    ]
    for name, d, values in (("default gate", r, result["rss_mb"]),
                            (f"gate {r2['retention_max_drop']}", r2, r2["rss_mb"])):
        lines += [
            f"**{name}**: RSS after start-up (partitions assigned, no round yet) {d['rss_at_start_mb']} MB",
            "",
            f"- per round (MB): " + ", ".join(f"{v:.1f}{'' if o == 'committed' else '×'}"
                                             for v, o in zip(values, d["round_outcomes"], strict=True))
            + " (× = round failed)",
            f"- after warm-up: min {d['min_mb']:.1f} MB, max {d['max_mb']:.1f} MB; against round "
            f"{d['warmup_rounds'] + 1} ({d['reference_mb']:.1f} MB): {d['max_below_rel']:+.1%} .. "
            f"{d['max_above_rel']:+.1%}",
            f"- largest change from one round to the next after warm-up: {_largest_step(values, d['warmup_rounds'])}",
            f"- outcomes: {d['statuses']}; publish-to-receipt per round (s): "
            + ", ".join(str(v) for v in d["publish_to_receipt_s"]),
            "",
        ]
    reasons = sorted({x["reason"].split(":")[0] for x in r["failed"]})
    if r["failed"]:
        lines += [f"Failed rounds with the default gate ({len(r['failed'])}): {', '.join(reasons)}; e.g. round "
                  f"{r['failed'][0]['round']}: {r['failed'][0]['reason']}.", ""]
    return "\n".join(lines)


def only_intake(cache: Path, threads_env: str) -> int:
    """Section 2 alone: one request applied (gate open: the replayed request must be `applied`), then the flood."""
    broker = Broker().start()
    try:
        res = phase_forget(broker, WORK / "intake-only", cache, threads_env, OPEN_GATE, n_forget=1)
        res["_replay_status"] = res["_by_id"].get(res["_bodies"][0]["request_id"])
        intake = phase_intake(broker, WORK / "intake-only", res, threads_env)
    finally:
        broker.stop()
    out = {"intake_msgs_per_s": intake["intake_msgs_per_s"], "intake": intake["detail"], "machine": _machine(),
           "loadavg": _load()}
    (WORK / "intake-only.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"wrote {WORK / 'intake-only.json'} (benchmarks/results untouched)", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--replot", action="store_true", help="only rewrite daemon.md and daemon_rss.png from daemon.json")
    ap.add_argument("--only", choices=("intake",),
                    help="run one section alone and print it (results/ untouched): intake = section 2 after a "
                         "one-request version of section 1 (gate open), for iterating on the intake path")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        result = json.loads((out / "daemon.json").read_text())
        plot(result, out / "daemon_rss.png")
        (out / "daemon.md").write_text(report(result))
        return 0
    from daemon.pipeline.config import Config

    defaults = Config()
    threads_env = str(os.cpu_count() or 1)
    load_before = _load()
    t_all = time.monotonic()
    cache = ensure_model()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    if args.only == "intake":
        return only_intake(cache, threads_env)

    def with_broker(fn):  # noqa: ANN001, ANN202
        broker = Broker().start()
        try:
            return fn(broker)
        finally:
            broker.stop()

    print(f"1a. {N_FORGET} forget requests at once, default gate ...", flush=True)

    def p1(broker: Broker) -> dict[str, Any]:
        res = phase_forget(broker, WORK / "forget-default", cache, threads_env, None)
        res["_daemon"].terminate(timeout=60)
        return res

    forget = with_broker(p1)
    print(json.dumps(forget["time_to_forget_s"]), forget["detail"]["statuses"], flush=True)

    print(f"1b. {N_FORGET} forget requests at once, gate {OPEN_GATE}; 2. intake ...", flush=True)

    def p2(broker: Broker) -> tuple[dict[str, Any], dict[str, Any]]:
        res = phase_forget(broker, WORK / "forget-open", cache, threads_env, OPEN_GATE)
        res["_replay_status"] = res["_by_id"].get(res["_bodies"][0]["request_id"])
        print(json.dumps(res["time_to_forget_s"]), res["detail"]["statuses"], flush=True)
        return res, phase_intake(broker, WORK / "forget-open", res, threads_env)

    forget_open, intake = with_broker(p2)
    print(f"intake_msgs_per_s {intake['intake_msgs_per_s']}", flush=True)

    print(f"3a. RSS over {RSS_WARMUP} + {RSS_ROUNDS} rounds, default gate ...", flush=True)
    rss = with_broker(lambda b: phase_rss(b, WORK / "rss-default", cache, threads_env, None))
    print(json.dumps(rss["rss_mb"]), rss["detail"]["round_outcomes"].count("committed"), flush=True)
    print(f"3b. RSS over {RSS_WARMUP} + {RSS_ROUNDS} rounds, gate {OPEN_GATE} ...", flush=True)
    rss_open = with_broker(lambda b: phase_rss(b, WORK / "rss-open", cache, threads_env, OPEN_GATE))
    print(json.dumps(rss_open["rss_mb"]), rss_open["detail"]["round_outcomes"].count("committed"), flush=True)
    load_after = _load()

    r = defaults.rounds
    result = {
        "time_to_forget_s": forget["time_to_forget_s"],
        "intake_msgs_per_s": intake["intake_msgs_per_s"],
        "rss_mb": rss["rss_mb"],
        "machine": _machine(),
        "settings": {
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_before": load_before, "loadavg_after": load_after,
            "total_wall_s": round(time.monotonic() - t_all, 1),
            "model": MODEL, "arch": "mnist_cnn", "pretrain_epochs": PRETRAIN_EPOCHS,
            "broker": "tansu (embedded, in-memory), 127.0.0.1",
            "omp_num_threads": threads_env,
            "config": {"max_instances": r.max_instances, "max_wait_s": r.max_wait_s, "method": r.method,
                       "preset": r.preset, "accumulation": r.accumulation, "retention_max_drop": r.retention_max_drop,
                       "threads": r.threads, "probe": defaults.models[0].probe,
                       "poll_timeout_ms": defaults.kafka.poll_timeout_ms,
                       "max_poll_records": defaults.kafka.max_poll_records,
                       "outbox_interval_s": defaults.daemon.outbox_interval_s,
                       "note": "the config file sets only kafka.bootstrap, state.dir, registry.dir, metrics.port "
                               "(and rounds.retention_max_drop in the supplementary runs); the rest are the "
                               "embedded defaults"},
            "bars": {"all_applied_s_max": BAR_ALL_APPLIED_S, "intake_msgs_per_s_min": BAR_INTAKE,
                     "rss_max_dev_rel": BAR_RSS_SPREAD},
            "top_level_fields": "time_to_forget_s and rss_mb: default configuration (retention gate 0.02); "
                                "rss_mb is VmRSS after every round's end (round_committed or round_failed), "
                                "warm-up rounds included (settings.rss.warmup_rounds)",
            "forget": forget["detail"],
            "forget_every_round_commits": {**forget_open["detail"], "time_to_forget": forget_open["time_to_forget_s"]},
            "intake": intake["detail"],
            "rss": rss["detail"],
            "rss_every_round_commits": {**rss_open["detail"], "rss_mb": rss_open["rss_mb"]},
        },
    }
    (out / "daemon.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "daemon_rss.png")
    (out / "daemon.md").write_text(report(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "settings")}, indent=2))
    print(f"wrote {out / 'daemon.json'}, {out / 'daemon.md'}, {out / 'daemon_rss.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
