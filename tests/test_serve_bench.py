"""The serving benchmark's phase schedule and its analysis, on synthetic request records (no server)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw) -> argparse.Namespace:
    base = dict(noswap_s=30.0, swap_s=60.0, notify_s=30.0, cycles=3, rate=600.0, connections=16, publish_every=2.0,
                poll_interval=0.2, server_threads=2, server_load_nice=10, publisher_nice=10, publisher_policy="nice",
                keep=5)
    base.update(kw)
    return argparse.Namespace(**base)


def test_the_phases_are_interleaved_back_to_back_and_keep_their_totals(bench):
    blocks = bench.schedule(100.0, _args())
    assert [b[0] for b in blocks] == ["noswap", "poll", "notify"] * 3
    assert blocks[0][1] == 100.0 and blocks[-1][2] == pytest.approx(220.0)
    assert all(a[2] == pytest.approx(b[1]) for a, b in zip(blocks, blocks[1:]))
    for name, total in (("noswap", 30.0), ("poll", 60.0), ("notify", 30.0)):
        assert sum(e - b for n, b, e in blocks if n == name) == pytest.approx(total)
    assert [b[0] for b in bench.schedule(0.0, _args(cycles=1))] == ["noswap", "poll", "notify"]


def test_the_noswap_p99_comes_from_every_noswap_block_and_never_from_a_swap_window(bench):
    args = _args(noswap_s=2.0, swap_s=2.0, notify_s=2.0, cycles=2)
    blocks = bench.schedule(0.0, args)           # noswap 0-1, poll 1-2, notify 2-3, noswap 3-4, poll 4-5, ...
    t = np.arange(0.0, 6.0, 0.001)
    lat = np.full(t.shape, 0.001)
    lat[(t >= 3.0) & (t < 3.5)] = 0.004          # a slow stretch in the second noswap block counts ...
    lat[(t >= 1.2) & (t < 1.3)] = 0.05           # ... and so does a swap window, but only on the swap side
    records = np.zeros(t.shape, dtype=bench.RECORD)
    records["t_send"], records["t_recv"], records["status"] = t, t + lat, 200
    records["version"] = np.where(t >= 2.25, 3, np.where(t >= 1.25, 2, 1))
    publishes = [{"phase": "poll", "version": 2, "t_start": 1.2, "t_latest": 1.21},
                 {"phase": "notify", "version": 3, "t_start": 2.2, "t_latest": 2.21, "notify_ok": True}]
    out = bench.analyse(records, blocks, publishes, args, (0.0,) * 3, (0.0,) * 3, 0, {2: 1.25, 3: 2.25})
    assert out["p99_noswap_ms"] == pytest.approx(4.0)
    assert out["p99_swap_ms"] == pytest.approx(50.0)
    assert out["rps"] == pytest.approx(1000.0)
    assert out["_detail"]["rps_by_phase"] == {"noswap": 1000.0, "poll": 1000.0, "notify": 1000.0}
    assert out["swap_latency_poll_s"] == pytest.approx(1.25 + 0.05 - 1.21)   # first v2 response arrives at 1.30
