"""Attack efficiency: per-example early exit against running every example for all iterations.

Same model, same instances, same targets and random starts (same seed): only ``early_exit``
differs, so the example-iteration counts and success rates compare directly.
Run: ``python -m daemon.bench.attack --weights W --out benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from daemon.bench.runner import forget_indices, machine_info
from daemon.data.mnist import load_mnist
from daemon.engine.attacks import TargetedL2PGD, other_class_targets
from daemon.engine.config import PRESETS
from daemon.engine.models import build_model
from daemon.registry import atomic_write_bytes


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, per_instance: int, eps: float,
            early_exit: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    targets = other_class_targets(y, 10, per_instance, gen)
    attack = TargetedL2PGD(model, eps=eps, step=0.1, iterations=100, early_exit=early_exit, batch_size=1024)
    t0 = time.perf_counter()
    res = attack(x.repeat_interleave(per_instance, 0), targets, gen)
    return {"early_exit": early_exit, "examples": int(res.x.shape[0]), "per_instance": per_instance, "eps": eps,
            "example_iterations": res.example_iterations, "full_iterations": int(res.x.shape[0]) * 100,
            "success_rate": res.success_rate, "median_iterations": float(res.iterations.float().median()),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--weights", default="var/bench-cache/mnist-mnist_cnn-e6-ls0.2.safetensors")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    m = load_mnist()
    model = build_model("mnist_cnn", num_classes=10, input_shape=(1, 28, 28), mean=[0.0], std=[1.0])
    model.load_state_dict(load_file(args.weights))
    model.eval()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        idx = forget_indices(60000, args.k, seed)
        for per in (PRESETS["default"].adv_per_instance, PRESETS["paper"].adv_per_instance):
            for early in (True, False):
                row = measure(model, m.train_x[idx], m.train_y[idx], per, 4.0, early, seed) | {"seed": seed, "k": args.k}
                rows.append(row)
                print(json.dumps(row), flush=True)
    paired = [(a, b) for a in rows for b in rows if a["early_exit"] and not b["early_exit"]
              and (a["seed"], a["per_instance"]) == (b["seed"], b["per_instance"])]
    summary = {
        "iteration_ratio": sum(b["example_iterations"] for _, b in paired) / sum(a["example_iterations"] for a, _ in paired),
        "time_ratio": sum(b["seconds"] for _, b in paired) / sum(a["seconds"] for a, _ in paired),
        "success_early_exit": sum(a["success_rate"] * a["examples"] for a, _ in paired) / sum(a["examples"] for a, _ in paired),
        "success_full": sum(b["success_rate"] * b["examples"] for _, b in paired) / sum(b["examples"] for _, b in paired),
    }
    doc = {"machine": machine_info("cpu"), "settings": {"k": args.k, "eps": 4.0, "step": 0.1, "iterations": 100,
                                                         "weights": args.weights}, "summary": summary, "rows": rows}
    path = Path(args.out) / "mnist_attack.json"
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
