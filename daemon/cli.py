"""``unlearnd``: the command line.

``pretrain`` trains a built-in architecture and ``import`` publishes an operator's own classifier
(``--factory pkg.module:callable`` + ``--weights``; see :mod:`daemon.registry.importer`) as version 1;
``unlearn`` runs one round on the latest version, rebuilt from its manifest's factory, and names its
round ``unlearn-<hex ms>`` (never the daemon's ``r-NNNNNN``, so a daemon can adopt the registry).

Exit codes (contract §7): 0 clean stop, 2 bad usage, input or configuration (with a message naming
what was wrong), 1 anything else — including a round that failed its bar (the model is unchanged).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.errors import UsageError

__all__ = ["UsageError", "main"]

DEFAULT_ARCH = {"mnist": "mnist_cnn", "cifar10": "cifar_resnet18"}
HEAD_HELP = ("the classifier head, as your module's named_modules() names it (e.g. heads.head): the layer whose "
             "output rows are the class logits (default: found by output width)")




# -- helpers ------------------------------------------------------------------------------------------
def _ints(text: str | None, what: str) -> list[int]:
    if text is None:
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from exc


def _smoothing(args: argparse.Namespace) -> dict[str, float]:
    """``--label-smoothing`` when given; otherwise the recipe's own default stands."""
    return {} if args.label_smoothing is None else {"label_smoothing": args.label_smoothing}


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` pairs (``daemon.engine.config.parse_settings``)."""
    from daemon.engine.config import parse_settings

    try:
        return parse_settings(pairs)
    except ValueError as exc:
        raise UsageError(f"--set wants key=value: {exc}") from exc


def _bar(total: int, desc: str):  # noqa: ANN202 - tqdm type
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)


def _load_splits(args: argparse.Namespace):  # noqa: ANN202
    from daemon.data.sources import load_dataset

    try:
        return load_dataset(args.dataset, Path(args.data_root) if args.data_root else None)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"--device must be cpu or cuda[:N], got {name!r}")
    return name


# -- pretrain -----------------------------------------------------------------------------------------
def cmd_pretrain(args: argparse.Namespace) -> int:
    from daemon.bench.runner import pretrain
    from daemon.engine.evaluate import accuracy
    from daemon.engine.session import UnlearningSession
    from daemon.engine.training import TrainConfig
    from daemon.registry import model_store

    splits = _load_splits(args)
    arch = args.arch or DEFAULT_ARCH[splits.name]
    try:
        config = TrainConfig(epochs=args.epochs, seed=args.seed, **_smoothing(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    device = _device(args.device)
    steps = config.epochs * ((splits.train_x.shape[0] + config.batch_size - 1) // config.batch_size)
    with _bar(steps, f"pretrain {arch}") as bar:
        model, secs = pretrain(arch, splits, config, device,
                               progress=lambda s, t, info: (bar.update(1), bar.set_postfix(loss=f"{info['loss']:.3f}")))
    acc = accuracy(model, splits.test_x, splits.test_y)
    session = UnlearningSession(model, num_classes=len(splits.classes), seed=args.seed)
    info = model_store.publish(Path(args.registry), args.model, model.cpu(), session, arch=arch,
                               input_shape=tuple(splits.train_x.shape[1:]), classes=splits.classes, parent=None,
                               dataset=splits.name, method={"name": "pretrain", "params": config.__dict__},
                               metrics={"acc_test": acc, "train_s": secs})
    print(f"pretrained {arch} on {splits.name}: test accuracy {acc:.4f} in {secs:.0f}s -> "
          f"{args.model} v{info.version} ({info.path})")
    return 0


# -- import -------------------------------------------------------------------------------------------
def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise UsageError(f"{what} must be comma-separated numbers, got {text!r}") from exc


def _import_spec(args: argparse.Namespace):  # noqa: ANN202 - ImportSpec, imported lazily
    from daemon.engine.models import ModelFactory
    from daemon.registry.importer import ImportSpec, read_classes

    shape = _ints(args.input_shape, "--input-shape")
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input-shape must be C,H,W (three positive integers), got {args.input_shape!r}")
    try:
        kwargs = json.loads(args.factory_kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--factory-kwargs must be a JSON object, got {args.factory_kwargs!r} ({exc})") from exc
    if not isinstance(kwargs, dict):
        raise UsageError(f"--factory-kwargs must be a JSON object, got {args.factory_kwargs!r}")
    mean = _floats(args.mean, "--mean") or [0.0] * shape[0]
    std = _floats(args.std, "--std") or [1.0] * shape[0]
    return ImportSpec(factory=ModelFactory(args.factory, kwargs), weights=Path(args.weights),
                      input_shape=(shape[0], shape[1], shape[2]), classes=tuple(read_classes(args.classes)),
                      mean=tuple(mean), std=tuple(std), head=args.head or None)


def cmd_import(args: argparse.Namespace) -> int:
    """Publish an operator's classifier (factory + weights) as version 1; nothing written on bad input."""
    from daemon.registry.importer import ImportRejected, describe_head, import_model

    try:
        info = import_model(Path(args.registry), args.model, _import_spec(args), seed=args.seed)
    except ImportRejected as exc:
        raise UsageError(str(exc)) from exc
    print(f"imported {args.factory} as {args.model} v{info.version} ({info.path}): input "
          f"{','.join(map(str, info.manifest['input_shape']))}, {len(info.manifest['classes'])} classes; "
          f"{describe_head(info)}")
    return 0


# -- unlearn ------------------------------------------------------------------------------------------
def _build_request(args: argparse.Namespace, splits, num_classes: int):  # noqa: ANN202
    import torch

    from daemon.engine.kinds import KINDS, get_kind
    from daemon.engine.requests import ForgetRequest

    kind = get_kind(args.kind)
    n = splits.train_y.shape[0]
    idx = _ints(args.forget_indices, "--forget-indices")
    if kind.names_class:
        if args.forget_class is None:
            raise UsageError(f"--kind {kind.name} needs --class C")
        if not 0 <= args.forget_class < num_classes:
            raise UsageError(f"--class must lie in [0, {num_classes - 1}], got {args.forget_class}")
        if not idx:
            members = (splits.train_y == args.forget_class).nonzero().squeeze(1)
            perm = torch.randperm(members.numel(), generator=torch.Generator().manual_seed(args.seed))
            idx = members[perm[:args.class_examples]].tolist()
    if not idx:
        raise UsageError("the forget set is empty: give --forget-indices")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise UsageError(f"--forget-indices out of range [0, {n - 1}]: {bad[:5]}")
    if len(set(idx)) != len(idx):
        raise UsageError("--forget-indices has duplicates")
    t = torch.tensor(idx, dtype=torch.int64)
    x, y = splits.train_x[t], splits.train_y[t]
    targets = None
    if kind.names_targets:
        targets_l = _ints(args.targets, "--targets")
        if len(targets_l) != len(idx):
            raise UsageError(f"--kind {kind.name} needs one --targets entry per instance ({len(idx)}), "
                             f"got {len(targets_l)}")
        targets = torch.tensor(targets_l, dtype=torch.int64)
    elif args.targets:
        only = " or ".join(name for name, k in KINDS.items() if k.names_targets)
        raise UsageError(f"--targets is only for --kind {only}")
    fc = args.forget_class if kind.names_class else None
    if kind.names_class and bool((y != fc).any()):
        raise UsageError(f"--forget-indices must all be examples of class {fc} for {kind.name}")
    request = ForgetRequest(args.kind, x, y, targets=targets, forget_class=fc)
    try:
        request.validate(num_classes=num_classes, input_shape=tuple(x.shape[1:]))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return request, t


def cmd_unlearn(args: argparse.Namespace) -> int:
    from daemon import keys, registry
    from daemon.bench.evaluation import EvalContext, drift_report, evaluate_model
    from daemon.engine.config import preset
    from daemon.engine.evaluate import predict
    from daemon.engine.methods import get_method
    from daemon.registry import model_store

    try:
        method = get_method(args.method)
        config = preset(args.preset, method.name, args.kind).with_overrides(**_overrides(args.set))
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    if method.oracle:
        raise UsageError(f"--method {method.name} is a benchmark oracle; use unlearnd bench")
    splits = _load_splits(args)
    try:
        state_key = keys.read_key(args.state_key, "state") if args.state_key else None
        live = model_store.load_live(Path(args.registry), args.model, device=_device(args.device),
                                     head=args.head or None, state_key=state_key)
    except (registry.RegistryError, FileNotFoundError, ValueError) as exc:
        raise UsageError(f"cannot load {args.model} from {args.registry}: {exc}") from exc
    if tuple(splits.train_x.shape[1:]) != live.input_shape:
        raise UsageError(f"dataset {splits.name} does not fit model {args.model} (input {live.input_shape})")
    request, idx = _build_request(args, splits, live.num_classes)
    test_before = predict(live.model, splits.test_x)
    acc_before = float((test_before == splits.test_y).float().mean())
    before = {n: p.detach().cpu().clone() for n, p in live.model.named_parameters()}
    with _bar(config.max_steps, f"{method.name} k={len(request)}") as bar:
        result, _ = live.session.run_round(
            request, method=method.name, config=config, sentinel=splits.test_x[:2000],
            progress=lambda s, t, acc: (bar.update(1), bar.set_postfix(forget_acc=f"{acc:.3f}")))
    model = live.model
    ctx = EvalContext(splits.train_x, splits.train_y, splits.test_x, splits.test_y,
                      float(live.info.manifest.get("metrics", {}).get("acc_test_original", acc_before)))
    # a failed round left the live model untouched: evaluate the weights it produced instead
    produced = model if result.succeeded else _with_state(model, result.state)
    evaluation = evaluate_model(produced, ctx, request, forgotten_union=idx, test_pred_before=test_before)
    evaluation.update(drift_report(produced, live.session.original, before))
    _print_table(request, result, splits.classes)
    print(f"outcome: {result.outcome}" + (f" ({result.reason})" if result.reason else "")
          + f"; steps {result.steps}; attack {result.attack_s:.1f}s, optimise {result.optimise_s:.1f}s")
    print(f"test accuracy {acc_before:.4f} -> {evaluation['acc_test']:.4f}; "
          f"forget accuracy {evaluation['acc_forget']}; membership AUC {evaluation['mia_auc']:.3f}")
    row = {"dataset": splits.name, "arch": live.arch, "method": method.name, "preset": args.preset,
           "kind": request.kind, "protocol": "single", "k": len(request), "seed": args.seed,
           "round": live.session.rounds_applied, "accumulation": live.session.accumulation,
           **evaluation, "acc_test_before": acc_before, "steps": result.steps, "attack_s": result.attack_s,
           "optimise_s": result.optimise_s, "wall_s": result.wall_s, "outcome": result.outcome}
    if result.succeeded:
        metrics = {k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and v == v}
        metrics["acc_test_original"] = ctx.acc_test_original
        info = model_store.publish(
            Path(args.registry), args.model, model.cpu(), live.session, arch=live.arch, factory=live.factory,
            head=live.head, input_shape=live.input_shape, classes=live.classes, parent=live.version,
            dataset=splits.name,
            round_id=f"unlearn-{int(time.time() * 1000):x}",      # not a daemon's r-NNNNNN: see check_consistency
            method={"name": method.name, "preset": args.preset, "params": config.to_dict()}, metrics=metrics,
            instances=len(request), state_key=state_key)
        row["model_version"] = info.version
        print(f"published {args.model} v{info.version} (parent v{live.version})")
    if args.json:
        from daemon.registry import atomic_write_bytes

        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
        atomic_write_bytes(Path(args.json), (json.dumps(clean, indent=1) + "\n").encode())
    if not result.succeeded:
        print(f"round failed: {result.outcome}; the model is unchanged", file=sys.stderr)
        return 1
    return 0


def _with_state(model, state):  # noqa: ANN001, ANN202
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone


def _print_table(request, result, classes) -> None:  # noqa: ANN001
    rows = [("#", "label", "target", "before", "after")]
    tg = request.targets.tolist() if request.targets is not None else [None] * len(request)
    for i, (y, t, b, a) in enumerate(zip(request.labels.tolist(), tg, result.predictions_before.tolist(),
                                         result.predictions_after.tolist())):
        if i >= 20:
            rows.append(("…", f"{len(request) - 20} more", "", "", ""))
            break
        rows.append((str(i), classes[y], "" if t is None else classes[t], classes[b], classes[a]))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


# -- bench --------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from daemon.bench.report import write_report
    from daemon.bench.runner import BenchPlan, parse_continual, parse_list, pretrain, run_benchmark
    from daemon.engine.config import preset
    from daemon.engine.methods import get_method
    from daemon.engine.training import TrainConfig
    from daemon.registry import atomic_write_bytes

    try:
        methods = parse_list(args.methods, str)
        for m in methods:
            get_method(m)
        plan = BenchPlan(
            dataset=args.dataset, arch=args.arch or DEFAULT_ARCH.get(args.dataset, "mnist_cnn"), methods=methods,
            ks=parse_list(args.k), seeds=parse_list(args.seeds), kinds=parse_list(args.kind, str),
            presets=parse_list(args.presets, str),
            continual=parse_continual(args.continual) if args.continual else None,
            accumulations=parse_list(args.accumulations, str),
            forget_classes=parse_list(args.forget_classes),
            train=TrainConfig(epochs=args.epochs, **_smoothing(args)),
            overrides=_overrides(args.set),
        )
        preset("default").with_overrides(**plan.overrides)    # a bad --set fails here, not rows into the run
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    if args.report_only:
        print(write_report(Path(args.out), args.dataset))
        return 0
    splits = _load_splits(args)
    device = _device(args.device)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    smoothing = f"-ls{plan.train.label_smoothing:g}" if plan.train.label_smoothing else ""
    weights = cache / f"{args.dataset}-{plan.arch}-e{plan.train.epochs}{smoothing}.safetensors"
    from safetensors.torch import load_file

    if weights.exists():
        state = load_file(str(weights))
    else:
        steps = plan.train.epochs * ((splits.train_x.shape[0] + plan.train.batch_size - 1) // plan.train.batch_size)
        with _bar(steps, "pretrain") as bar:
            model, _ = pretrain(plan.arch, splits, plan.train, device, progress=lambda s, t, i: bar.update(1))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        from safetensors.torch import save

        atomic_write_bytes(weights, save(state))
    torch.manual_seed(0)
    path = run_benchmark(plan, splits, state, out=Path(args.out), device=device, resume=args.resume)
    print(f"rows: {path}")
    print(write_report(Path(args.out), args.dataset))
    return 0


# -- demo ---------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Pre-train once (cached in the demo registry), then forget a few MNIST digits, printing before/after."""
    from daemon import registry

    reg = Path(args.dir) / "registry"
    if registry.latest_version(reg, "mnist-cnn") is None:
        rc = main(["pretrain", "--dataset", "mnist", "--registry", str(reg), "--model", "mnist-cnn"])
        if rc:
            return rc
    # each run is the next continual round: it forgets the next few training digits
    latest = registry.latest_version(reg, "mnist-cnn") or 1
    start = (latest - 1) * args.count
    indices = ",".join(str(i) for i in range(start, start + args.count))
    print(f"round {latest}: forgetting mnist-train:{start}..{start + args.count - 1} from mnist-cnn v{latest}")
    return main(["unlearn", "--registry", str(reg), "--model", "mnist-cnn", "--dataset", "mnist",
                 "--forget-indices", indices, "--method", "adv_imp"])


# -- parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from daemon.engine.kinds import KINDS, ForgetInstances

    p = argparse.ArgumentParser(prog="unlearnd", description="continual-unlearning daemon for PyTorch classifiers")
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dataset", default="mnist", help="mnist (built in) or cifar10 (needs --data-root)")
        sp.add_argument("--data-root", help="folder holding cifar-10-batches-py (torchvision's format)")
        sp.add_argument("--device", default="cpu", help="cpu or cuda[:N]")

    sp = sub.add_parser("pretrain", help="train the classifier and publish version 1")
    data_args(sp)
    sp.add_argument("--registry", required=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--arch", help="mnist_cnn (default for mnist) or cifar_resnet18")
    sp.add_argument("--epochs", type=int, default=6)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--label-smoothing", type=float, default=None,
                    help="pre-training label smoothing (0 to <1; default: the recipe's, 0.2)")
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("import", help="publish your own classifier (factory + weights) as version 1")
    sp.add_argument("--registry", required=True)
    sp.add_argument("--model", required=True, help="the model's name in the registry")
    sp.add_argument("--factory", required=True, help="pkg.module:callable returning the nn.Module")
    sp.add_argument("--factory-kwargs", default="{}", help="JSON object of keyword arguments for the factory")
    sp.add_argument("--weights", required=True,
                    help="the module's state_dict: .safetensors, or torch.save'd (read with weights_only)")
    sp.add_argument("--input-shape", required=True, help="C,H,W of one input (float32 in [0, 1])")
    sp.add_argument("--mean", help="per-channel mean, comma-separated (default 0)")
    sp.add_argument("--std", help="per-channel std, comma-separated (default 1)")
    sp.add_argument("--classes", required=True, help="a file with one class name per line, or a count N")
    sp.add_argument("--head", help=HEAD_HELP)
    sp.add_argument("--seed", type=int, default=0, help="seed of the continual session")
    sp.set_defaults(func=cmd_import)

    sp = sub.add_parser("unlearn", help="one round from the latest version, published as the next")
    data_args(sp)
    sp.add_argument("--registry", required=True)
    sp.add_argument("--model", required=True)
    sp.add_argument("--forget-indices", help="training-set indices (mnist-train:<i> numbering), comma-separated")
    sp.add_argument("--method", default="adv_imp")
    sp.add_argument("--preset", default="default", help="default or paper")
    sp.add_argument("--kind", default=ForgetInstances.name, choices=tuple(KINDS))
    sp.add_argument("--targets", help="relabel targets, one per instance")
    sp.add_argument("--class", dest="forget_class", type=int, help="the class to forget (forget_class)")
    sp.add_argument("--class-examples", type=int, default=64, help="examples of the class when no indices given")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset setting")
    sp.add_argument("--json", help="write the round's evaluation as one benchmark row")
    sp.add_argument("--head", help=HEAD_HELP + "; must agree with the one unlearnd import recorded, if any")
    sp.add_argument("--state-key", help="the state key file (keys.state_key_file) that opens the version's sealed "
                    "continual state and seals the one published; without it the state is read and written in clear")
    sp.set_defaults(func=cmd_unlearn)

    sp = sub.add_parser("bench", help="the unlearning benchmark (benchmarks/results/<dataset>.json)")
    data_args(sp)
    sp.add_argument("--arch")
    sp.add_argument("--methods", default="neggrad,adv,adv_imp,random_label,boundary_shrink,retrain")
    sp.add_argument("--k", default="16,64,128")
    sp.add_argument("--seeds", default="0,1,2")
    sp.add_argument("--kind", default=ForgetInstances.name, help=f"comma-separated: {', '.join(KINDS)}")
    sp.add_argument("--presets", default="default,paper")
    sp.add_argument("--continual", help="ROUNDSxK, e.g. 10x32")
    sp.add_argument("--accumulations", default="none,sum,max,decayed")
    sp.add_argument("--forget-classes", default="", help="classes for --kind forget_class")
    sp.add_argument("--epochs", type=int, default=6, help="pre-training (and retrain oracle) epochs")
    sp.add_argument("--label-smoothing", type=float, default=None,
                    help="pre-training (and retrain oracle) label smoothing (default: the recipe's, 0.2)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a default-preset setting")
    sp.add_argument("--out", default="benchmarks/results")
    sp.add_argument("--cache", default="var/bench-cache")
    sp.add_argument("--resume", action="store_true", help="keep rows already in the results file")
    sp.add_argument("--report-only", action="store_true", help="only rebuild the report and plots")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("demo", help="offline demo: pretrain once (cached), then forget a few digits")
    sp.add_argument("--dir", default="var/demo")
    sp.add_argument("--count", type=int, default=8, help="digits forgotten per run")
    sp.set_defaults(func=cmd_demo)

    # The serving and daemon layers register their own commands (one module each, kept out of here).
    from daemon.serving import cli as serving_cli
    from daemon.pipeline import cli as service_cli
    serving_cli.add_commands(sub)
    service_cli.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"unlearnd {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
