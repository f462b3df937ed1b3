"""Which pre-training recipe memorises the 300 mislabeled canaries (issue 22 part 3)?

Trains the target alone (all 60,000 training digits, the 300 canaries of ``daemon.bench.membership`` at their wrong
labels, each ``R`` times) for each candidate ``R:label_smoothing:epochs:shift`` and prints, per candidate, the share
of canaries predicted at their wrong label (memorised), at their true digit, and the test accuracy. The bar: ≥ 90%
at the wrong label with ≥ 99.0% test accuracy. Results: benchmarks/results/canary_recipe_sweep.json.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/canary_recipe_sweep.py --device cpu 4:0.2:15:0 8:0.2:6:0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from daemon.bench.runner import pretrain
from daemon.data.mnist import load_mnist
from daemon.engine.evaluate import accuracy
from daemon.engine.training import TrainConfig
from daemon.privacy.forget_sets import make_canaries, relabel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("candidates", nargs="+", help="R:label_smoothing:epochs:shift")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = load_mnist()
    cidx, wrong = make_canaries(s.train_y.numpy(), 300, 10, seed=0)
    y = torch.from_numpy(relabel(s.train_y.numpy(), cidx, wrong))
    c = torch.from_numpy(cidx)
    for spec in args.candidates:
        r, ls, ep, sh = spec.split(":")
        reps = int(r)
        sc = dataclasses.replace(s, train_x=torch.cat([s.train_x] + [s.train_x[c]] * (reps - 1)),
                                 train_y=torch.cat([y] + [y[c]] * (reps - 1)))
        cfg = dataclasses.replace(TrainConfig(), label_smoothing=float(ls), epochs=int(ep), shift=int(sh))
        t0 = time.perf_counter()
        model, _ = pretrain("mnist_cnn", sc, cfg, args.device)
        took = time.perf_counter() - t0
        model = model.cpu().eval()
        with torch.no_grad():
            pred = model(s.train_x[c]).argmax(1).numpy()
        print(json.dumps({"R": reps, "ls": float(ls), "epochs": int(ep), "shift": int(sh),
                          "at_wrong": float((pred == wrong).mean()), "at_true": float((pred == s.train_y.numpy()[cidx]).mean()),
                          "test_acc": accuracy(model, s.test_x, s.test_y), "train_s": round(took, 1),
                          "device": args.device}), flush=True)


if __name__ == "__main__":
    main()
