"""The life of a model with exact rebases (issue 21, mode ``rebase``): the real daemon, a real broker, 100 × 32.

A daemon (``python -m daemon.cli run``) owns the benchmark's pretrained MNIST CNN (the base of
``benchmarks/lifetime_bench.py``) with a training source (``[models.rebase] source = "mnist-train"``) and a
rebase every ``--every`` deletions. Requests of 32 random training digits (refs, true labels) are published
open-loop, one every ``--interval`` seconds (the arrival rate of deletions; a round of 32 takes less), so requests
keep arriving while rebases train. Afterwards every published version is read back from the registry and
measured on the 10,000 test digits and on every instance forgotten up to it.

What the issue's bars need, from the daemon's own outputs:
- test loss against the original at every published version (``rows``: one per version, ``outcome``
  ``applied`` for a round, ``rebased`` for a rebase);
- each request's wait (publish → its ``applied`` receipt here) against two rounds' time (twice the median
  ``round_committed`` duration of the daemon's log), for the requests published while a rebase trained;
- every rebase excludes every forgotten instance: the rebase's ``excluded`` count (its manifest) against the
  content hashes the ledger holds up to its snapshot, and each of the benchmark's own forgotten digits up to the
  snapshot found among them (content hash computed here, independently of the daemon).

    PYTHONPATH=. .venv/bin/python benchmarks/lifetime_rebase.py --requests 100 --every 96 --interval 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from kafka import KafkaProducer  # noqa: E402

from daemon.bench.runner import machine_info  # noqa: E402
from daemon.data.content import content_sha256  # noqa: E402
from daemon.data.sources import load_dataset  # noqa: E402
from daemon.engine.evaluate import predict  # noqa: E402
from daemon.registry import atomic_write_bytes, list_versions  # noqa: E402
from daemon.registry.model_store import load_live  # noqa: E402
from daemon_bench import ReceiptWatcher  # noqa: E402
from tests.pipeline_harness import Broker, DaemonProcess, free_port  # noqa: E402

MODEL = "lifetime"


def _config(path: Path, *, bootstrap: str, registry_dir: Path, state_dir: Path, every: int, epochs: int,
            threads: int) -> None:
    path.write_text(f"""
[kafka]
bootstrap = "{bootstrap}"
poll_timeout_ms = 100
[state]
dir = "{state_dir}"
[registry]
dir = "{registry_dir}"
[rounds]
max_instances = 32
max_wait_s = 1.0
threads = {threads}
[daemon]
outbox_interval_s = 0.2
[[models]]
name = "{MODEL}"
dataset = "mnist"
probe = "mnist-test:0-1999"
[models.rebase]
source = "mnist-train"
epochs = {epochs}
every_deletions = {every}
""")


def _body(i: int, idx: list[int], labels: list[int]) -> bytes:
    return json.dumps({"schema": "unlearn.request/v1", "request_id": f"life-{i:04d}", "model": MODEL, "kind": "forget",
                       "instances": [{"id": f"life/{i}/{j}", "ref": f"mnist-train:{k}", "label": lab}
                                     for j, (k, lab) in enumerate(zip(idx, labels, strict=True))]}).encode()


def _epoch(iso: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _ledger_hashes(state_dir: Path, upto_seq: int) -> set[str]:
    """The content hashes the ledger holds for the model up to a rebase's snapshot (read-only, after the run)."""
    db = sqlite3.connect(f"file:{state_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT content_sha256 FROM forgotten_content WHERE model = ? AND seq <= ?",
                          (MODEL, upto_seq)).fetchall()
    finally:
        db.close()
    return {r[0] for r in rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=96, help="[models.rebase] every_deletions")
    ap.add_argument("--epochs", type=int, default=6, help="[models.rebase] epochs (the base was trained with 6)")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between two requests")
    ap.add_argument("--threads", type=int, default=2, help="[rounds] threads of the daemon")
    ap.add_argument("--work", type=Path, default=Path("var/lifetime"))
    ap.add_argument("--out", type=Path, default=Path("var/lifetime/parts"))
    args = ap.parse_args(argv)
    if args.k != 32:
        raise SystemExit("the daemon's rounds hold 32 instances ([rounds] max_instances) in this benchmark")
    base = args.work / "base" / "registry"
    if not (base / MODEL).exists():
        raise SystemExit(f"no base model in {base}: run benchmarks/lifetime_bench.py once (it pretrains it)")
    run = args.work / "runs" / f"rebase-mnist_cnn-s{args.seed}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shutil.copytree(base, run / "registry")
    splits = load_dataset("mnist", None)
    perm = torch.randperm(splits.train_x.shape[0], generator=torch.Generator().manual_seed(1000 + args.seed))
    shape = tuple(splits.train_x.shape[1:])

    broker = Broker().start()
    cfg = run / "unlearnd.toml"
    _config(cfg, bootstrap=broker.bootstrap, registry_dir=run / "registry", state_dir=run / "state",
            every=args.every, epochs=args.epochs, threads=args.threads)
    daemon = DaemonProcess(cfg, run / "daemon.log", env={"OMP_NUM_THREADS": str(args.threads)}).start()
    published: dict[str, float] = {}
    published_wall: dict[str, float] = {}
    indices: dict[str, list[int]] = {}
    try:
        daemon.wait_assigned(timeout=180)
        watcher = ReceiptWatcher(broker.bootstrap)
        producer = KafkaProducer(bootstrap_servers=[broker.bootstrap], acks="all", max_request_size=4 << 20)
        t0 = time.monotonic()
        for i in range(args.requests):
            while time.monotonic() < t0 + i * args.interval:
                time.sleep(0.05)
            idx = perm[i * args.k:(i + 1) * args.k].tolist()
            rid = f"life-{i:04d}"
            producer.send("unlearn.requests", key=MODEL.encode(), value=_body(i, idx, splits.train_y[idx].tolist()))
            producer.flush()
            published[rid] = time.monotonic()
            published_wall[rid] = time.time()
            indices[rid] = idx
            done = watcher.outcomes("life-")
            print(f"{time.monotonic() - t0:7.0f} s published {rid}; {len(done)} outcomes", flush=True)
        outcomes = watcher.wait("life-", args.requests, timeout=max(1800.0, 3 * args.interval * args.requests))
        # the last rebase (if one is due) finishes before the run ends: wait for the daemon to go quiet
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            ev = daemon.events()
            started = sum(1 for e in ev if e.get("event") == "rebase_training")
            ended = sum(1 for e in ev if e.get("event") in ("rebase_committed", "rebase_failed"))
            if started == ended:
                break
            time.sleep(2)
        events = daemon.events()
        watcher.close()
    finally:
        daemon.terminate(timeout=120)
        broker.stop()

    # -- measure every version ------------------------------------------------------------------------------
    receipts = {rid: r for rid, (t, r) in outcomes.items()}
    waited = {rid: t - published[rid] for rid, (t, r) in outcomes.items() if r.get("status") == "applied"}
    applied_at: dict[int, list[str]] = {}
    for rid, r in receipts.items():
        if r.get("status") == "applied":
            applied_at.setdefault(int(r["model_version"]), []).append(rid)
    rounds_s = [float(e["engine_s"]) for e in events if e.get("event") == "round_committed" and "engine_s" in e]
    round_median = statistics.median(rounds_s) if rounds_s else None
    trains: dict[str, dict[str, Any]] = {}      # per rebase: when it trained and ended (the log's clock)
    for e in events:
        if e.get("event") == "rebase_training":
            trains[e["rebase_id"]] = {"start": _epoch(e["timestamp"]), "end": None}
        elif e.get("event") in ("rebase_committed", "rebase_failed") and e.get("rebase_id") in trains:
            trains[e["rebase_id"]]["end"] = _epoch(e["timestamp"])
            trains[e["rebase_id"]]["outcome"] = e["event"]
    test_x, test_y = splits.test_x, splits.test_y
    original = load_live(run / "registry", MODEL, 1).model
    acc_original = float((predict(original, test_x) == test_y).float().mean())
    rows: list[dict[str, Any]] = []
    forgotten: list[int] = []
    rebases: list[dict[str, Any]] = []
    versions = list_versions(run / "registry", MODEL)
    for v in versions[1:]:
        live = load_live(run / "registry", MODEL, v)
        manifest = live.info.manifest
        method = manifest.get("method") or {}
        for rid in sorted(applied_at.get(v, [])):
            forgotten += indices[rid]
        acc = float((predict(live.model, test_x) == test_y).float().mean())
        fx = splits.train_x[forgotten] if forgotten else test_x[:0]
        union = float((predict(live.model, fx) == splits.train_y[forgotten]).float().mean()) if forgotten else None
        row = {"mode": "rebase", "arch": "mnist_cnn", "seed": args.seed, "round": v - 1, "version": v,
               "deletions": len(forgotten), "acc_test": acc, "acc_test_original": acc_original,
               "acc_forget_union": union, "outcome": "rebased" if method.get("name") == "rebase" else "applied",
               "gate_rejected": False, "wall_s": None, "memory_fill": live.session.memory.fill(),
               "requests": sorted(applied_at.get(v, []))}
        if method.get("name") == "rebase":
            snap = int(method["snapshot_seq"])
            ledger = _ledger_hashes(run / "state", snap)
            ours = [rid for rid, r in receipts.items() if r.get("status") == "applied"
                    and int(r["model_version"]) < v and rid not in method.get("reapplied", [])]
            want = {content_sha256(splits.train_x[i].reshape(shape)) for rid in ours for i in indices[rid]}
            rebases.append({"version": v, "rebase_id": method.get("rebase_id"), "excluded": method.get("excluded"),
                            "ledger_hashes": len(ledger), "bench_forgotten_before": len(want),
                            "all_in_ledger": want <= ledger, "reapplied": method.get("reapplied", []),
                            "train_seconds": method.get("train_seconds")})
        rows.append(row)
    waits_during = {rid: w for rid, w in waited.items()
                    if any(t["start"] <= published_wall[rid] <= (t["end"] or float("inf")) for t in trains.values())}
    summary = {
        "requests": args.requests, "applied": sum(1 for r in receipts.values() if r.get("status") == "applied"),
        "failed": sum(1 for r in receipts.values() if r.get("status") == "failed"),
        "exact": sum(1 for e in events if e.get("event") == "rebase_committed"),
        "round_median_s": round_median, "max_wait_s": max(waited.values()) if waited else None,
        "waits_s": waited, "rebases": rebases, "trains": trains,
        "max_loss_pp": max((100 * (acc_original - r["acc_test"]) for r in rows), default=None),
        "gate_rejections": sum(1 for e in events if e.get("event") == "round_failed"
                               and "retention gate" in str(e.get("reason", ""))),
        "gate_deferred": sum(1 for e in events if e.get("event") == "round_deferred"),
        "rebases_failed": sum(1 for e in events if e.get("event") == "rebase_failed"),
        "waits_during_rebase": waits_during,
        "max_wait_during_rebase_s": max(waits_during.values()) if waits_during else None,
        "wait_bar_s": 2 * round_median if round_median else None,
    }
    doc = {"machine": machine_info("cpu"), "settings": {"mode": "rebase", "arch": "mnist_cnn", "seed": args.seed,
                                                      "k": args.k, "requests": args.requests, "every": args.every,
                                                      "epochs": args.epochs, "interval_s": args.interval,
                                                      "threads": args.threads, "label": ""},
           "summary": summary, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / f"rebase-mnist_cnn-s{args.seed}.json", json.dumps(doc, indent=1).encode())
    print(json.dumps({k: v for k, v in summary.items() if k != "waits_s"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
