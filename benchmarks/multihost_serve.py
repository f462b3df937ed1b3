"""Two `unlearnd serve` replicas reading one S3 bucket: time from the bucket's ``LATEST`` written to both serving it.

Issue 24's bar: "`unlearnd serve` replicas in two processes read the bucket and both serve each new version within
1 s". Here: moto's standalone S3 server on 127.0.0.1 (the object store), a publisher that writes each version to a
local working copy and pushes it as the daemon does (files, manifest, then ``LATEST``), and two `unlearnd serve`
processes with their own caches (`--registry s3://… --cache-dir …`, default poll interval). For each version the
clock starts when the PUT of ``LATEST`` returns and stops, per replica, at the first inference answered by the new
version (each replica is asked every 10 ms by its own thread). Results: ``benchmarks/results/multihost_serve.json``,
``.md`` and ``.png``.

    PYTHONPATH=. .venv/bin/python benchmarks/multihost_serve.py [--versions 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from daemon.registry.remote import S3Location, make_client, push_version  # noqa: E402
from tests.test_serve import NAME, Server, free_port, publish, served_version  # noqa: E402

PREFIX = "reg/"
POLL_ASK_S = 0.01


def _until_served(server: Server, version: int, start: float, out: dict[str, float], key: str,
                  timeout: float = 30.0) -> None:
    while time.monotonic() - start < timeout:
        if served_version(server) == version:
            out[key] = time.monotonic() - start
            return
        time.sleep(POLL_ASK_S)


def run(versions: int) -> dict:
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint, bucket = f"http://127.0.0.1:{port}", f"bench-{uuid.uuid4().hex[:8]}"
    client = make_client(endpoint)
    client.create_bucket(Bucket=bucket)
    loc = S3Location(bucket, PREFIX)
    url = f"s3://{bucket}/{PREFIX}"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        writer = Path(tmp) / "writer"
        first = publish(writer)
        push_version(client, loc, writer, NAME, first.version)
        replicas = [Server(url, NAME, "--s3-endpoint-url", endpoint, "--cache-dir",  # type: ignore[arg-type]
                           str(Path(tmp) / f"cache-{n}"), "--poll-interval", str(args_poll))
                    for n in ("a", "b")]
        try:
            for _ in range(versions):
                info = publish(writer)
                push_version(client, loc, writer, NAME, info.version, set_latest=False)   # files, manifest
                time.sleep(0.3)                       # a quiet moment, so each version starts alike
                client.put_object(Bucket=bucket, Key=loc.key(NAME, "LATEST"), Body=f"{info.version}\n".encode())
                start = time.monotonic()
                seen: dict[str, float] = {}
                threads = [threading.Thread(target=_until_served, args=(r, info.version, start, seen, k))
                           for r, k in zip(replicas, ("a", "b"), strict=True)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                both = max(seen.values()) if len(seen) == 2 else None
                rows.append({"version": info.version, "replica_a_s": seen.get("a"), "replica_b_s": seen.get("b"),
                             "both_s": both})
                print(f"v{info.version}: a {seen.get('a')}, b {seen.get('b')}", flush=True)
        finally:
            for r in replicas:
                r.stop()
            moto.stop()
    both = [r["both_s"] for r in rows if r["both_s"] is not None]
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs; "
                   f"load average {os.getloadavg()[0]:.1f} at the end)",
        "settings": {"versions": versions, "replicas": 2, "poll_interval_s": args_poll, "object_store": "moto "
                     "standalone server (in memory) on 127.0.0.1", "model": "MNIST CNN (built-in), ~850 kB model.pt",
                     "ask_every_s": POLL_ASK_S},
        "bar_s": 1.0,
        "median_s": round(statistics.median(both), 3) if both else None,
        "max_s": round(max(both), 3) if both else None,
        "missed": versions - len(both),
        "per_version": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }


def report(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "multihost_serve.json").write_text(json.dumps(result, indent=2) + "\n")
    met = result["max_s"] is not None and result["max_s"] <= result["bar_s"] and not result["missed"]
    s = result["settings"]
    lines = [
        "# Two `unlearnd serve` replicas on one S3 bucket: LATEST written → both serving it (issue 24)", "",
        f"`benchmarks/multihost_serve.py` ({s['versions']} versions, {s['replicas']} replicas, each its own cache, "
        f"poll interval {s['poll_interval_s']} s; {s['object_store']}; {s['model']}). Machine: {result['machine']}.",
        "", f"**Median {result['median_s']} s, max {result['max_s']} s** for both replicas to serve a new version; "
        f"bar ≤ {result['bar_s']} s: **{'met' if met else 'NOT met'}**"
        + (f" ({result['missed']} versions not served within 30 s)" if result["missed"] else "") + ".", "",
        "| version | replica a (s) | replica b (s) | both (s) |", "| ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['version']} | {r['replica_a_s']} | {r['replica_b_s']} | {r['both_s']} |"
              for r in result["per_version"]]
    lines += ["", "The time is a poll (up to the interval), the bucket's `LATEST` read, the version's files pulled "
              "and hash-checked into the cache, the server's own verification and a weight-only load. A publisher "
              "that notifies the servers (`serving.notify_urls`) skips the poll's wait.", ""]
    (RESULTS / "multihost_serve.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["per_version"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key, label in (("replica_a_s", "replica a"), ("replica_b_s", "replica b")):
        ax.plot([r["version"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.axhline(result["bar_s"], color="red", linestyle="--", label="bar (1 s)")
    ax.set_xlabel("version")
    ax.set_ylabel("LATEST written → served (s)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "multihost_serve.png", dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--poll-interval", type=float, default=0.2, help="the replicas' (serve's default: 0.2)")
    ns = parser.parse_args()
    args_poll = ns.poll_interval
    out = run(ns.versions)
    report(out)
    print(json.dumps({k: out[k] for k in ("median_s", "max_s", "missed")}))
