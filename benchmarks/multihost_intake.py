"""The ledger on SQLite and on PostgreSQL (issue 24): intake of invalid/duplicate messages and the 32-at-once time.

Runs benchmarks/daemon_bench.py's sections 1 and 2 unchanged (the same 6-epoch MNIST model, the default
configuration, the same 20,000-message flood: 5,000 not JSON, 5,000 schema errors, 10,000 byte-identical replays
of an applied request) once with the ledger in ``state.dir`` (SQLite) and once in a PostgreSQL database
(``UNLEARND_STATE_URL``) on a local server started by tests/pg_harness.py with PostgreSQL's durable defaults
(fsync, synchronous commit). Writes the ``sqlite`` and ``postgres`` sections of benchmarks/results/multihost.json
(benchmarks/multihost_report.py) and rewrites multihost.md/png.

Run from the repository root: ``.venv/bin/python benchmarks/multihost_intake.py [--engines sqlite,postgres]``.
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
from multihost_report import merge  # noqa: E402

from tests.pipeline_harness import Broker, DaemonProcess  # noqa: E402

WORK = ROOT / "var" / "bench-multihost"


def _with_ledger(url: str | None) -> None:
    """daemon_bench starts every daemon through its ``start_daemon``: add the PostgreSQL URL to their environment."""
    def start_daemon(cfg: Path, log: Path, threads_env: str) -> DaemonProcess:
        env = {"OMP_NUM_THREADS": threads_env, **({"UNLEARND_STATE_URL": url} if url else {})}
        return DaemonProcess(cfg, log, env=env).start()
    daemon_bench.start_daemon = start_daemon


def model_note(cache: Path) -> str:
    """Which pretrained model the run used (daemon_bench pretrains 6 epochs into its cache when it is empty)."""
    import json

    manifest = json.loads((cache / daemon_bench.MODEL / "1" / "manifest.json").read_text())
    epochs = manifest.get("method", {}).get("params", {}).get("epochs")
    acc = manifest.get("metrics", {}).get("acc_test")
    return f"{daemon_bench.MODEL} pretrained {epochs} epochs (test accuracy {acc}) from {cache}"


def run_engine(engine: str, cache: Path, threads_env: str) -> tuple[dict[str, Any], dict[str, Any]]:
    base = WORK / engine
    shutil.rmtree(base, ignore_errors=True)
    server = None
    if engine == "postgres":
        from tests.pg_harness import PostgresServer

        server = PostgresServer(durable=True).start()
    t0 = time.monotonic()
    broker = Broker().start()
    try:
        url = server.new_database() if server is not None else None
        _with_ledger(url)
        forget = daemon_bench.phase_forget(broker, base, cache, threads_env, None)
        forget["_replay_status"] = forget["_by_id"].get(forget["_bodies"][0]["request_id"])
        intake = daemon_bench.phase_intake(broker, base, forget, threads_env)
    finally:
        broker.stop()
        if server is not None:
            server.stop()
    ttf = forget["time_to_forget_s"]
    section = {"intake_msgs_per_s": intake["intake_msgs_per_s"], "all_applied_s": ttf["all_applied_s"]}
    detail = {"intake": intake["detail"],
              "forget": {"p50": ttf["p50"], "p99": ttf["p99"], "statuses": forget["detail"]["statuses"],
                         "rounds": forget["detail"]["rounds"],
                         "daemon_startup_to_assigned_s": forget["detail"]["daemon_startup_to_assigned_s"]},
              "wall_s": round(time.monotonic() - t0, 1), "model": model_note(cache),
              "ledger": "PostgreSQL (tests/pg_harness.py, durable settings), one database"
              if engine == "postgres" else "SQLite in state.dir (WAL, synchronous=NORMAL)"}
    return section, detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--engines", default="sqlite,postgres")
    ap.add_argument("--threads", default="2", help="OMP_NUM_THREADS of the daemons (a user's default: the cores)")
    args = ap.parse_args()
    cache = daemon_bench.ensure_model()
    update: dict[str, Any] = {"detail": {}}
    for engine in args.engines.split(","):
        print(f"== {engine}", flush=True)
        section, detail = run_engine(engine, cache, args.threads)
        print(section, flush=True)
        update[engine] = section
        update["detail"][engine] = detail
    merge(update)
    print(f"wrote {daemon_bench.RESULTS / 'multihost.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
