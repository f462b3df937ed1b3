"""Membership before unlearning (issue 22 parts 2–3): what there is to forget in each forget set.

Trains (or reuses from the cache) a target MNIST model with 300 mislabeled canaries, and reference models on
random halves of the same training data with the same recipe; reports RMIA (AUC, TPR at 1% / 0.1% FPR with
intervals) and the loss AUC for the canary, atypical and random sets at k = 16 / 64 / 128, 3 seeds, and the
attack on non-members only (≈0.5). Run: ``PYTHONPATH=. .venv/bin/python benchmarks/membership_before.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from daemon.bench.runner import pretrain
from daemon.data.mnist import load_mnist
from daemon.engine.models import build_model
from daemon.engine.training import TrainConfig
from daemon.privacy.attack import membership_report, rmia_scores
from daemon.privacy.forget_sets import make_canaries, most_atypical, relabel
from daemon.privacy.reference import ensure_references
from daemon.registry import atomic_write_bytes


def true_probs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        p = torch.cat([model(x[i:i + 4096]).softmax(1) for i in range(0, x.shape[0], 4096)])
    return p.gather(1, y[:, None]).squeeze(1).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=8)
    ap.add_argument("--canaries", type=int, default=300)
    ap.add_argument("--cache", default="var/privacy-cache")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    s = load_mnist()
    n = s.train_y.shape[0]
    cidx, wrong = make_canaries(s.train_y.numpy(), args.canaries, 10, seed=0)
    y_train = torch.from_numpy(relabel(s.train_y.numpy(), cidx, wrong))
    sc = dataclasses.replace(s, train_y=y_train)
    cfg = TrainConfig()
    recipe = {"arch": "mnist_cnn", "train": dataclasses.asdict(cfg), "canaries": args.canaries, "canary_seed": 0}

    def train(idx: np.ndarray, seed: int) -> dict:
        keep = np.ones(n, bool)
        keep[idx] = False
        model, _ = pretrain("mnist_cnn", sc, dataclasses.replace(cfg, seed=seed), "cpu",
                            exclude=torch.from_numpy(np.flatnonzero(keep)))
        return model.state_dict()

    t0 = time.perf_counter()
    refs = ensure_references(args.cache, recipe, args.refs, n, train)
    ref_wall = time.perf_counter() - t0
    tgt = ensure_references(args.cache, recipe | {"target": True}, 1, n, lambda idx, seed: pretrain(
        "mnist_cnn", sc, cfg, "cpu")[0].state_dict(), seed=99)  # the target saw every training digit

    def build(state: dict) -> torch.nn.Module:
        mean, std = s.mean_std()
        model = build_model("mnist_cnn", num_classes=10, input_shape=(1, 28, 28), mean=mean, std=std)
        model.load_state_dict(state)
        return model.eval()

    x_all = torch.cat([s.train_x, s.test_x])
    y_all = torch.cat([y_train, s.test_y])
    target = true_probs(build(tgt.states[0]), x_all, y_all)
    ref = np.stack([true_probs(build(st), x_all, y_all) for st in refs.states])
    ref_in = np.concatenate([refs.in_mask, np.zeros((args.refs, s.test_y.shape[0]), bool)], axis=1)
    test = n + np.random.default_rng(0).permutation(s.test_y.shape[0])
    pop, nonm = test[:5000], test[5000:]
    # atypical: lowest held-out margin-like score (held-out true-label probability) among non-canaries
    atyp_pool = most_atypical(np.log(np.maximum(ref[:, :n], 1e-12)), refs.in_mask, 128, exclude=cidx)
    rows = []
    for k in (16, 64, 128):
        for seed in (0, 1, 2):
            rng = np.random.default_rng(seed)
            rand = rng.choice(np.setdiff1d(np.arange(n), cidx), k, replace=False)
            sets = {"canary": rng.choice(cidx, k, replace=False), "atypical": rng.choice(atyp_pool, k, replace=False),
                    "random": rand}
            for name, members in sets.items():
                r = membership_report(target, ref, ref_in, members, nonm, target[pop], ref[:, pop], seed=seed)
                rows.append({"forget_set": name, "k": k, "seed": seed} | r)
                print(json.dumps({kk: rows[-1][kk] for kk in ("forget_set", "k", "seed", "auc", "tpr1", "loss_auc")}),
                      flush=True)
    half = nonm.size // 2
    null = membership_report(target, ref, ref_in, nonm[:half], nonm[half:], target[pop], ref[:, pop])
    out = Path(args.out)
    result = {"references": args.refs, "reference_train_seconds": refs.train_seconds,
              "references_trained_now": refs.trained_now, "reference_wall_s": ref_wall,
              "canaries": args.canaries, "nonmembers": int(nonm.size), "population": int(pop.size),
              "attack": "rmia", "rows": rows, "nonmembers_only": null}
    atomic_write_bytes(out / "membership_before.json", json.dumps(result, indent=1).encode())
    lines = ["# Membership before unlearning (RMIA, MNIST benchmark recipe, 300 mislabeled canaries)", "",
             f"{args.refs} reference models on random halves, {np.mean(refs.train_seconds):.1f} s each to train "
             f"(2-core CPU); non-members: {nonm.size} test digits; RMIA population: {pop.size} other test digits.", "",
             f"Non-members against non-members (nothing to find): AUC {null['auc']:.3f} "
             f"[{null['auc_ci_hm'][0]:.3f}, {null['auc_ci_hm'][1]:.3f}].", "",
             "| set | k | AUC (mean of 3 seeds) | AUC range | TPR@1% | TPR@0.1% | loss AUC |", "|---|---|---|---|---|---|---|"]
    for name in ("canary", "atypical", "random"):
        for k in (16, 64, 128):
            rs = [r for r in rows if r["forget_set"] == name and r["k"] == k]
            a = [r["auc"] for r in rs]
            lines.append(f"| {name} | {k} | {np.mean(a):.3f} | {min(a):.3f}–{max(a):.3f} | "
                         f"{np.mean([r['tpr1'] for r in rs]):.3f} | {np.mean([r['tpr01'] for r in rs]):.3f} | "
                         f"{np.mean([r['loss_auc'] for r in rs]):.3f} |")
    atomic_write_bytes(out / "membership_before.md", ("\n".join(lines) + "\n").encode())
    plot(target, ref, ref_in, cidx, atyp_pool, nonm, pop, out / "membership_before.png")


def plot(target, ref, ref_in, cidx, atyp, nonm, pop, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rmia_scores(target, ref, ref_in, target[pop], ref[:, pop])
    fig, ax = plt.subplots(figsize=(5, 5))
    rng = np.random.default_rng(0)
    for name, members in (("canary (300)", cidx), ("atypical (128)", atyp),
                          ("random (300)", rng.choice(np.setdiff1d(np.arange(60000), cidx), 300, replace=False))):
        thr = np.sort(np.concatenate([s[members], s[nonm]]))[::-1]
        fpr = [(s[nonm] >= t).mean() for t in thr]
        tpr = [(s[members] >= t).mean() for t in thr]
        ax.plot(np.maximum(fpr, 1e-4), np.maximum(tpr, 1e-4), label=name)
    ax.plot([1e-4, 1], [1e-4, 1], "k:", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="FPR", ylabel="TPR", title="RMIA before unlearning (MNIST)")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
