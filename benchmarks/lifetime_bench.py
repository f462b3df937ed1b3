"""The life of a model (issue 21): a long run of continual rounds through the daemon's own round path.

What runs is what the daemon runs, minus Kafka and the ledger: every round's request is a real request body
(refs to ``mnist-train`` items) decoded by the daemon's codec, labelled as intake labels it, unlearned by
:meth:`ModelRuntime.run_round` (the engine round on the live session, gated on the retention probe of the
daemon's configuration) and published by :meth:`ModelRuntime.publish` into a registry. The continual state
(importance, subspace memory) goes through the registry like the daemon's: every ``--reload-every`` rounds,
and on ``--resume``, the runtime is reopened from the registry's LATEST as a restarted daemon would.

Per round one row (``ROW_FIELDS``) goes to ``<out>/<mode>-<arch>-s<seed>.json`` (written atomically after
every round, so a stopped run keeps what it measured and ``--resume`` goes on from the registry).

    PYTHONPATH=. .venv/bin/python benchmarks/lifetime_bench.py --rounds 100 --k 32 --seed 0 \
        --work var/lifetime --out var/lifetime/parts [--set KEY=VALUE ...] [--resume]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from daemon.bench.runner import machine_info
from daemon.engine.config import parse_settings
from daemon.engine.evaluate import predict
from daemon.pipeline.codec import decode_request
from daemon.pipeline.config import load_config
from daemon.pipeline.intake import fill_labels
from daemon.pipeline.pending import PendingRequest
from daemon.pipeline.runtime import ModelRuntime
from daemon.registry import atomic_write_bytes
from daemon.registry.ops import prune

ROW_FIELDS = ("mode", "arch", "seed", "round", "deletions", "acc_test", "acc_test_original", "acc_probe",
              "acc_forget", "acc_forget_union", "relapse", "outcome", "gate_rejected", "reason", "steps",
              "wall_s", "round_s", "memory_fill", "frozen_layers", "version", "commit")
MODEL = "lifetime"


def _config_toml(registry_dir: Path, state_dir: Path, k: int, pretrain_epochs: int, settings: list[str],
                 extra_rounds: dict[str, Any]) -> str:
    rounds = {"max_instances": k, **extra_rounds}
    lines = ["[registry]", f'dir = "{registry_dir}"', "[state]", f'dir = "{state_dir}"', "[rounds]"]
    lines += [f"{key} = {json.dumps(v)}" for key, v in rounds.items()]
    lines += ["[[models]]", f'name = "{MODEL}"', 'dataset = "mnist"', 'probe = "mnist-test:0-1999"',
              f"pretrain_epochs = {pretrain_epochs}", f"settings = {json.dumps(settings)}"]
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Part:
    """One run's rows, written atomically after each round."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "rows": []}
        if path.exists():
            self.data["rows"] = json.loads(path.read_text())["rows"]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        atomic_write_bytes(self.path, json.dumps(self.data, indent=1).encode())


def _request_body(rnd: int, idx: list[int], labels: list[int]) -> bytes:
    instances = [{"id": f"bench/{rnd}/{j}", "ref": f"mnist-train:{i}", "label": lab}
                 for j, (i, lab) in enumerate(zip(idx, labels, strict=True))]
    return json.dumps({"schema": "unlearn.request/v1", "request_id": f"r{rnd:04d}", "model": MODEL,
                       "kind": "forget", "instances": instances}).encode()


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.shape[0] == 0:
        return float("nan")
    return float((predict(model, x).cpu() == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", default="data_free", choices=("data_free",))
    ap.add_argument("--label", default="", help="a name for this variant (part file and rows)")
    ap.add_argument("--work", type=Path, default=Path("var/lifetime"))
    ap.add_argument("--out", type=Path, default=Path("var/lifetime/parts"))
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="engine settings over the preset (as [[models]] settings)")
    ap.add_argument("--rounds-set", action="append", default=[], metavar="KEY=VALUE",
                    help="[rounds] settings of the daemon configuration (e.g. memory_energy=0.99)")
    ap.add_argument("--reload-every", type=int, default=10, help="reopen the runtime from the registry (0: never)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parse_settings(args.settings)                 # refuse a malformed --set before any work
    extra_rounds = parse_settings(args.rounds_set)

    name = f"{args.mode}-mnist_cnn-s{args.seed}" + (f"-{args.label}" if args.label else "")
    base = args.work / "base"                     # one pretrained version 1, shared by every run
    run = args.work / "runs" / name
    out = args.out / f"{name}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.resume and run.exists():
        shutil.rmtree(run)
        out.unlink(missing_ok=True)
    if not (base / "registry" / MODEL).exists():
        base.mkdir(parents=True, exist_ok=True)
        cfg = base / "unlearnd.toml"
        cfg.write_text(_config_toml(base / "registry", base / "state", args.k, args.pretrain_epochs, [], {}))
        config = load_config(cfg, env={})
        print(f"pretraining the base model ({args.pretrain_epochs} epochs)", flush=True)
        ModelRuntime.open(config.models[0], base / "registry", config.rounds).ensure_model()
    if not run.exists():
        run.mkdir(parents=True)
        shutil.copytree(base / "registry", run / "registry")
    cfg = run / "unlearnd.toml"
    cfg.write_text(_config_toml(run / "registry", run / "state", args.k, 0, args.settings, extra_rounds))
    config = load_config(cfg, env={})

    rt = ModelRuntime.open(config.models[0], run / "registry", config.rounds)
    rt.ensure_model()
    splits = rt.splits
    assert splits is not None
    test_x, test_y = splits.test_x, splits.test_y
    train_labels = splits.train_y
    perm = torch.randperm(splits.train_x.shape[0], generator=torch.Generator().manual_seed(1000 + args.seed))
    original = copy.deepcopy(rt.live.model)
    with torch.no_grad():
        for n, p in original.named_parameters():
            p.copy_(rt.live.session.original[n])
    acc_test_original = _accuracy(original, test_x, test_y)

    header = {"machine": machine_info(config.rounds.device),
              "settings": {"mode": args.mode, "arch": "mnist_cnn", "k": args.k, "rounds": args.rounds,
                           "seed": args.seed, "label": args.label, "engine_settings": args.settings,
                           "rounds_settings": extra_rounds, "method": config.rounds.method,
                           "preset": config.rounds.preset, "accumulation": config.rounds.accumulation,
                           "memory_energy": config.rounds.memory_energy,
                           "retention_max_drop": config.rounds.retention_max_drop,
                           "probe": config.models[0].probe, "pretrain_epochs": args.pretrain_epochs,
                           "threads": args.threads, "reload_every": args.reload_every}}
    part = Part(out, header)
    done = len(part.rows)
    applied = [r for r in part.rows if r["outcome"] == "applied"]
    if len(applied) != rt.version - 1:
        raise SystemExit(f"{out} has {len(applied)} applied rounds but the registry is at version {rt.version}: "
                         "start again without --resume")
    forgotten = [i for r in part.rows if r["outcome"] == "applied" for i in r["indices"]]
    commit = _git_commit()
    spec = {MODEL: rt.spec}
    for rnd in range(done + 1, args.rounds + 1):
        t0 = time.time()
        idx = perm[(rnd - 1) * args.k: rnd * args.k].tolist()
        decoded = decode_request(_request_body(rnd, idx, train_labels[idx].tolist()), MODEL.encode(), spec)
        labels, targets = fill_labels(decoded, rt.predict_at_intake)
        pending = PendingRequest(decoded=decoded, topic="bench", partition=0, offset=rnd, received_at=time.time(),
                                 labels=labels, targets=targets)
        candidate = rt.run_round([pending], should_abort=lambda: False)
        result = candidate.result
        if candidate.passed:
            method = {"name": config.rounds.method, "preset": config.rounds.preset,
                      "params": result.config.to_dict()}
            rt.publish(candidate, f"r-{uuid.uuid4().hex[:12]}", method)
            forgotten += idx
            prune(run / "registry", MODEL, keep=2)
        round_s = time.time() - t0
        if args.reload_every and rnd % args.reload_every == 0:
            rt = ModelRuntime.open(config.models[0], run / "registry", config.rounds)
            rt.ensure_model()
            spec = {MODEL: rt.spec}
        model = rt.live.model
        now = set(idx) if candidate.passed else set()
        earlier = [i for i in forgotten if i not in now]
        fx = splits.train_x[forgotten]
        ex = splits.train_x[earlier]
        row = {
            "mode": args.mode, "arch": "mnist_cnn", "seed": args.seed, "round": rnd, "deletions": len(forgotten),
            "acc_test": _accuracy(model, test_x, test_y), "acc_test_original": acc_test_original,
            "acc_probe": rt.probe_accuracy(), "acc_forget": result.acc_forget,
            "acc_forget_union": _accuracy(model, fx, train_labels[forgotten]),
            "relapse": _accuracy(model, ex, train_labels[earlier]),
            "outcome": "applied" if candidate.passed else "failed",
            "gate_rejected": bool(candidate.reason and candidate.reason.startswith("retention gate")),
            "reason": candidate.reason, "steps": result.steps, "wall_s": result.wall_s, "round_s": round_s,
            "memory_fill": rt.live.session.memory.fill(), "frozen_layers": list(result.frozen_layers),
            "version": rt.version, "commit": commit, "indices": idx,
        }
        part.add(row)
        print(f"round {rnd:3d} {row['outcome']:7s} deletions {row['deletions']:4d} test "
              f"{100 * (acc_test_original - row['acc_test']):5.2f} pp  relapse {row['relapse']:.3f}  steps "
              f"{row['steps']:4d}  {row['wall_s']:5.1f} s  fill "
              + " ".join(f"{v:.2f}" for v in row["memory_fill"].values())
              + (f"  ({candidate.reason})" if candidate.reason else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
