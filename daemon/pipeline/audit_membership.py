"""``unlearnd audit membership``: the CLI around :func:`daemon.privacy.audit.membership_audit`.

The auditor names the model and the instances the way requests do (refs into the model's sources, from the
daemon's own config), a version (default ``LATEST``), and optionally the reference models they trained without
the instances. The held-out data is the model's probe (data it never trained on, by the operator's choice), or
``--against``; probe items of classes the version has forgotten are left out, as the daemon's check does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "cmd_audit_membership"]


def add_arguments(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("membership (audit membership)")
    g.add_argument("--model", help="the [[models]] name")
    g.add_argument("--version", type=int, help="the version to audit (default: LATEST)")
    g.add_argument("--ref", action="append", default=[], help="an instance, as a request names it (repeatable)")
    g.add_argument("--instances", help="a file of refs, one per line (# comments)")
    g.add_argument("--against", help="held-out data as <source>:<start>-<end> (default: the model's probe)")
    g.add_argument("--reference-weights", action="append", default=[],
                   help="a state dict of the same architecture trained WITHOUT the instances (repeatable): adds "
                        "offline RMIA, the strong attack")
    g.add_argument("--margin", type=float, default=0.03, help="|AUC - 0.5| within which instances count as unseen")
    g.add_argument("--json", help="write the full result here")


def _refs(args: argparse.Namespace) -> list[str]:
    refs = list(args.ref)
    if args.instances:
        try:
            lines = Path(args.instances).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise _usage(f"--instances {args.instances}: {exc}") from exc
        refs += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not refs:
        raise _usage("audit membership needs instances: --ref REF (repeatable) or --instances FILE")
    return refs


def _usage(message: str) -> Exception:
    from daemon.errors import UsageError

    return UsageError(message)


def _heldout(spec: str, sources: dict, shape: tuple[int, int, int], forgotten: frozenset[int], setting: str
             ) -> tuple[Any, Any]:
    import torch

    from daemon.data.sources import RefError
    from daemon.pipeline.config import parse_probe

    try:
        name, start, end = parse_probe(spec)
    except ValueError as exc:
        raise _usage(f"{setting} {spec!r}: {exc}") from exc
    if name not in sources:
        raise _usage(f"{setting} {spec!r}: unknown source {name!r} (known: {', '.join(sorted(sources))})")
    end = len(sources[name]) if end is None else end
    if end > len(sources[name]) or end - start < 2:
        raise _usage(f"{setting} {spec!r}: needs at least 2 items within {name}'s {len(sources[name])}")
    y = sources[name].labels[start:end].to(torch.int64)
    try:
        x = sources[name].items(list(range(start, end)), shape)
    except RefError as exc:
        raise _usage(f"{setting} {spec!r}: {exc}") from exc
    keep = ~torch.isin(y, torch.tensor(sorted(forgotten), dtype=torch.int64)) if forgotten else torch.ones_like(
        y, dtype=torch.bool)
    return x[keep], y[keep]


def _references(paths: list[str], factory: Any, channels: int) -> list[Any]:
    from daemon.engine.models import build_classifier
    from daemon.registry.importer import ImportRejected, load_weights

    models = []
    for path in paths:
        try:
            state = load_weights(Path(path))
            model = build_classifier(factory, mean=[0.0] * channels, std=[1.0] * channels)
            model.load_state_dict(state, strict=True)
        except (ImportRejected, RuntimeError) as exc:
            raise _usage(f"--reference-weights {path}: {exc}") from exc
        models.append(model.eval())
    return models


def cmd_audit_membership(args: argparse.Namespace, config: Any) -> int:
    from daemon import registry
    from daemon.data.sources import RefError, resolve_refs
    from daemon.pipeline.runtime import RuntimeError_, _forgotten_classes, open_sources
    from daemon.privacy.audit import membership_audit
    from daemon.registry import model_store

    if not args.model:
        raise _usage("audit membership needs --model")
    section = config.model(args.model)
    if section is None:
        raise _usage(f"--model {args.model}: not in the config (models: {', '.join(m.name for m in config.models)})")
    refs = _refs(args)
    try:
        sources, _splits = open_sources(section)
    except RuntimeError_ as exc:
        raise _usage(str(exc)) from exc
    try:
        model, info, factory = model_store.load_model(Path(config.registry.dir), args.model, args.version)
    except (registry.RegistryError, ValueError) as exc:
        raise _usage(f"cannot load {args.model} from {config.registry.dir}: {exc}") from exc
    shape = tuple(info.manifest["input_shape"])
    try:
        x, y = resolve_refs(refs, sources, shape)
    except RefError as exc:
        raise _usage(f"{exc.reason}: {exc}") from exc
    hx, hy = _heldout(args.against or section.probe, sources, shape, _forgotten_classes(info.manifest),
                      "--against" if args.against else f"models.{args.model}.probe")
    references = _references(args.reference_weights, factory, shape[0])
    result = membership_audit(model, x, y, hx, hy, len(info.manifest["classes"]), margin=args.margin,
                              references=references)
    result = {"model": args.model, "version": info.version, **result}
    check, conf = result["check"], result["confidence"]
    print(f"{args.model} v{info.version}: {result['instances']} instance(s) against {result['reference_size']} "
          f"held-out examples")
    print(f"  receipts' check (per-class LiRA confidence): AUC {check['auc']:.3f} "
          f"[{check['auc_ci95'][0]:.3f}, {check['auc_ci95'][1]:.3f}] -> {check['verdict']}")
    print(f"  confidence against all held-out: AUC {conf['auc']:.3f}, TPR@1% FPR {conf['tpr1']:.3f}, "
          f"TPR@0.1% FPR {conf['tpr01']:.3f}")
    if result["rmia"] is not None:
        rm = result["rmia"]
        print(f"  RMIA (offline, {rm['references']} reference model(s)): AUC {rm['auc']:.3f} "
              f"[{rm['auc_ci_hm'][0]:.3f}, {rm['auc_ci_hm'][1]:.3f}], TPR@1% FPR {rm['tpr1']:.3f} "
              f"-> {result['verdict_rmia']}")
    else:
        print("  no reference models (--reference-weights): the strong attack was not run")
    if args.json:
        from daemon.registry import atomic_write_bytes

        atomic_write_bytes(Path(args.json), (json.dumps(result, indent=1) + "\n").encode())
    sys.stdout.flush()
    return 0
