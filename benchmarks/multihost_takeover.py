"""Two hosts, kill -9 of an owner mid-round, twice (issue 24): every request applied exactly once?

Daemons as "hosts" (tests/multihost_harness.py): separate processes with their own state directories, sharing
only a PostgreSQL ledger (tests/pg_harness.py, durable settings), one registry directory, the key files and one
Tansu broker; three models (the 6-epoch MNIST model of benchmarks/daemon_bench.py under three names), rounds of at
most four instances.

1. host-1 (armed to SIGKILL itself after its first version reaches the registry, before the ledger records it)
   and host-2 share the models; a first batch of requests goes out; host-1 dies mid-commit; host-2 takes its
   models over (rolls that round forward) and applies everything.
2. host-3 joins and takes some models from host-2; a second batch goes out; host-2 is SIGKILLed from outside as
   soon as it has started a round of the batch; host-3 takes its models over and applies the rest.

Counts from the receipts on unlearn.receipts and from the registry's manifests: ``requests``, ``applied`` (exactly
one applied receipt and in exactly one published version), ``duplicates`` (applied twice anywhere, or a round
published as two versions), ``lost`` (no outcome receipt). Writes the ``takeover`` section of
benchmarks/results/multihost.json. Run: ``.venv/bin/python benchmarks/multihost_takeover.py [--per-model 4]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import daemon_bench  # noqa: E402
from multihost_intake import model_note  # noqa: E402
from multihost_report import merge  # noqa: E402

from tests.multihost_harness import MODELS, Cluster, bodies, send, shared_keys, tally, wait_outcomes  # noqa: E402
from tests.pg_harness import PostgresServer  # noqa: E402
from tests.pipeline_harness import Broker, copy_registry  # noqa: E402

WORK = ROOT / "var" / "bench-multihost" / "takeover"
ROUNDS = "max_instances = 4"


def _taken_at(host: Any, models: list[str], after: float) -> float | None:
    """When ``host`` logged model_taken_over for all of ``models`` (wall-clock epoch seconds), or None."""
    from datetime import datetime

    seen: dict[str, float] = {}
    for e in host.process.events():
        if e.get("event") == "model_taken_over" and e.get("model") in models:
            ts = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            if ts >= after:
                seen.setdefault(e["model"], ts)
    return max(seen.values()) if len(seen) == len(models) else None


def run(per_model: int, source: Path | None = None) -> dict[str, Any]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    cache = source or daemon_bench.ensure_model()
    reg = copy_registry(cache, WORK / "registry", names=MODELS)
    server, broker = PostgresServer(durable=True).start(), Broker().start()
    cluster = Cluster(WORK, broker.bootstrap, reg, server.new_database())
    keys = shared_keys(WORK / "secrets")
    kills: list[str] = []
    takeover_s: list[float | None] = []
    h1 = None
    try:
        h1 = cluster.start_host("host-1", failpoints="after_registry_write", keys=keys, rounds=ROUNDS)
        h1.process.wait_assigned(timeout=180)
        h2 = cluster.start_host("host-2", keys=keys, rounds=ROUNDS)
        owners = cluster.wait_split(timeout=180)
        lost_1 = sorted(m for m, h in owners.items() if h is h1)
        first = bodies({m: per_model for m in MODELS}, prefix="mh1")
        t0 = time.monotonic()
        send(broker.bootstrap, first)
        assert h1.process.wait(timeout=300) == -9, h1.process.tail()
        killed_at = time.time()
        kills.append(f"host-1 SIGKILLed itself at failpoint after_registry_write (owned {lost_1})")
        wait_outcomes(broker.bootstrap, [b["request_id"] for b in first], timeout=600)
        t = _taken_at(h2, lost_1, killed_at)
        takeover_s.append(round(t - killed_at, 1) if t else None)

        h3 = cluster.start_host("host-3", keys=keys, rounds=ROUNDS)
        cluster.hosts.remove(h1)
        owners = cluster.wait_split(timeout=180)
        lost_2 = sorted(m for m, h in owners.items() if h is h2)
        second = bodies({m: per_model for m in MODELS}, prefix="mh2", first=3000)
        mark = len(h2.process.events())
        send(broker.bootstrap, second)
        h2.process.wait_for(lambda e: e.get("event") == "round_started", timeout=300, after=mark)
        time.sleep(1.0)                                     # mid-round: training, nothing recorded yet
        h2.process.kill()
        killed_at = time.time()
        kills.append(f"host-2 SIGKILLed from outside 1 s into a round (owned {lost_2})")
        everything = first + second
        records = wait_outcomes(broker.bootstrap, [b["request_id"] for b in everything], timeout=600)
        all_s = time.monotonic() - t0
        t = _taken_at(h3, lost_2, killed_at)
        takeover_s.append(round(t - killed_at, 1) if t else None)
        resolved = sum(1 for h in (h2, h3) for e in h.process.events()
                       if e.get("event") == "model_taken_over" and e.get("rounds_resolved"))
        h3.process.terminate()
    finally:
        for h in [*cluster.hosts, *([h1] if h1 is not None else [])]:
            h.process.kill()
        broker.stop()
        server.stop()
    result = tally(records, [b["request_id"] for b in everything], reg, MODELS)
    return {"takeover": {"requests": result.requests, "applied": result.applied, "duplicates": result.duplicates,
                         "lost": result.lost},
            "detail": {"takeover": {
                "setup": f"3 models x {per_model} single-instance forget requests, twice; PostgreSQL ledger, one "
                         f"registry directory, one Tansu; [rounds] {ROUNDS}; kafka.static_membership = false",
                "model": f"{model_note(cache)}, under three names",
                "kills": kills, "versions": result.versions, "other": result.other,
                "rounds_resolved": resolved, "all_outcomes_s": round(all_s, 1), "takeover_s": takeover_s}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--per-model", type=int, default=4)
    ap.add_argument("--registry", type=Path, default=None,
                    help="a registry holding a pretrained mnist-cnn (default: daemon_bench's 6-epoch cache)")
    args = ap.parse_args()
    update = run(args.per_model, args.registry)
    print(update, flush=True)
    merge(update)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
