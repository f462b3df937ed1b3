"""``unlearnd import``: an operator's own classifier (factory + weights + input spec + class names) as version 1.

The weights file holds the state dict of the module the factory returns (the operator's own module,
``model.state_dict()`` as they trained it), not of the ``Normalize → module`` wrapper unlearnd adds:
normalisation (``mean``/``std``) comes from the command line and is wrapped inside the model, as for
the built-ins. It loads with ``strict=True`` from safetensors, or from a ``torch.save``'d state dict
read with ``torch.load(weights_only=True)`` (a pickle of anything but tensors is refused).

Everything is checked before the registry is touched: the factory imports and returns an
``nn.Module``, the weights match it key for key and shape for shape, a batch of the declared input
shape runs through it and gives finite ``[N, classes]`` logits, and the model exports to TorchScript.
Any failure raises :class:`ImportRejected` naming the thing and the fix, and nothing is written.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daemon import registry
from daemon.engine.heads import find_head
from daemon.engine.models import FactoryError, ModelFactory, Normalize, backbone_module_name
from daemon.engine.session import UnlearningSession
from daemon.registry import model_store

__all__ = ["ImportRejected", "ImportSpec", "describe_head", "import_model", "load_weights", "read_classes"]

_SHOWN = 5          # keys named in a mismatch message


class ImportRejected(ValueError):
    """Bad input to ``unlearnd import``; the message names the thing and the fix. Nothing was written."""


@dataclass(frozen=True)
class ImportSpec:
    """What the operator declares: the factory, the weights file, the input spec and the class names."""

    factory: ModelFactory
    weights: Path
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: str | None = None     # the classifier head as the operator's module names it (None: found per round)


def read_classes(value: str) -> list[str]:
    """``--classes``: an integer N (names "0".."N-1") or a file with one class name per line."""
    text = value.strip()
    if text.isdigit():
        n = int(text)
        if n < 2:
            raise ImportRejected(f"--classes {value}: a classifier needs at least 2 classes")
        return [str(i) for i in range(n)]
    path = Path(value)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportRejected(f"--classes {value}: neither an integer nor a readable UTF-8 file with one class "
                             f"name per line ({exc})") from exc
    names = [line.strip() for line in lines if line.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ImportRejected(f"--classes {value}: needs at least 2 distinct non-empty names, one per line "
                             f"(got {len(names)}, {len(set(names))} distinct)")
    return names


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, else from a ``torch.save``'d dict of tensors (weights_only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ImportRejected(f"--weights {path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        pass                                   # not safetensors: try a torch.save'd state dict
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), None)
        if refused is None:
            raise ImportRejected(f"--weights {path}: neither a safetensors file nor a torch.save'd state dict "
                                 f"(not a pickle torch.load can read)") from exc
        raise ImportRejected(f"--weights {path}: torch.load(weights_only=True) refuses this pickle, which holds "
                             f"more than tensors ({refused}); save model.state_dict() with torch.save or "
                             f"safetensors.torch.save_file instead") from exc
    except Exception as exc:  # noqa: BLE001 - any other unreadable file
        raise ImportRejected(f"--weights {path}: neither a safetensors file nor a torch.save'd state dict "
                             f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ImportRejected(f"--weights {path}: holds a {type(state).__name__}, not a state dict of tensors; "
                             f"save model.state_dict() of the module the factory returns")
    return dict(state)


def _load_strict(backbone: nn.Module, state: Mapping[str, torch.Tensor], spec: ImportSpec) -> None:
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{what} {len(keys)}: {', '.join(keys[:_SHOWN])}{' …' if len(keys) > _SHOWN else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if keys]
    if problems:
        raise ImportRejected(f"--weights {spec.weights} do not match the module of {spec.factory.ref}: "
                             f"{'; '.join(problems)}. The file must hold that module's state_dict() (not a "
                             f"wrapper's); check --factory-kwargs (e.g. num_classes)")
    backbone.load_state_dict(state, strict=True)


def _check_forward(model: nn.Module, spec: ImportSpec) -> None:
    shape = ",".join(str(d) for d in spec.input_shape)
    x = torch.rand((2, *spec.input_shape), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # noqa: BLE001 - foreign forward code
        raise ImportRejected(f"the model of {spec.factory.ref} rejects inputs of --input-shape {shape} "
                             f"({type(exc).__name__}: {exc}); give the shape (C,H,W) it was trained on") from exc
    n = len(spec.classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ImportRejected(f"the model of {spec.factory.ref} returns {got} for a batch of 2, not logits [N, {n}] "
                             f"for the {n} --classes; return one logit per class (a plain tensor)")
    if not bool(torch.isfinite(out).all()):
        raise ImportRejected(f"the model of {spec.factory.ref} with --weights {spec.weights} gives non-finite "
                             f"logits on inputs in [0, 1] of --input-shape {shape}; check the weights and "
                             f"--mean/--std")


def build_checked(spec: ImportSpec) -> nn.Sequential:
    """The operator's module with its weights, wrapped with ``Normalize``, checked to classify the input spec."""
    try:
        backbone = spec.factory.build()
    except FactoryError as exc:
        raise ImportRejected(str(exc)) from exc
    _load_strict(backbone, load_weights(spec.weights), spec)
    try:
        norm = Normalize(spec.mean, spec.std)
    except ValueError as exc:
        raise ImportRejected(f"--mean/--std: {exc}") from exc
    if norm.mean.numel() != spec.input_shape[0]:
        raise ImportRejected(f"--mean/--std give {norm.mean.numel()} values for {spec.input_shape[0]} input "
                             f"channels; give one per channel")
    model = nn.Sequential(norm, backbone).eval()
    _check_forward(model, spec)
    return model


def import_model(registry_dir: Path, name: str, spec: ImportSpec, *, seed: int = 0,
                 provenance: Mapping[str, Any] | None = None) -> registry.VersionInfo:
    """Check everything, then publish the model as version 1 with a fresh continual session."""
    if registry.list_versions(registry_dir, name) or (Path(registry_dir) / name / registry.LATEST_FILE).exists():
        raise ImportRejected(f"model {name!r} already exists in {registry_dir}; import under a new --model name "
                             f"or into another --registry")
    model = build_checked(spec)
    engine_head = None
    if spec.head is not None:
        try:
            engine_head = model_store.check_head(model, len(spec.classes), spec.head, "--head")
        except ValueError as exc:
            raise ImportRejected(str(exc)) from None
    session = UnlearningSession(model, num_classes=len(spec.classes), seed=seed, head=engine_head)
    try:
        return model_store.publish(
            Path(registry_dir), name, model, session, factory=spec.factory, head=spec.head,
            input_shape=spec.input_shape, classes=spec.classes, parent=None,
            method={"name": "import", "params": {"weights": spec.weights.name, "head_found": _head_found(model, spec),
                                                 **dict(provenance or {})}})
    except ValueError as exc:   # write_version checks everything (incl. the TorchScript export) before writing
        raise ImportRejected(f"cannot publish {name!r}: {exc}") from exc


def _head_found(model: nn.Module, spec: ImportSpec) -> str | None:
    """The head class rounds will scope to when none is declared (found by output width on an input of the
    spec), as the operator's module names it; recorded so that the operator learns it before the first round."""
    x = torch.rand((1, *spec.input_shape), generator=torch.Generator().manual_seed(0))
    try:
        name = find_head(model, len(spec.classes), x=x).name
    except ValueError:
        return None
    return backbone_module_name(name)


def describe_head(info: registry.VersionInfo) -> str:
    """The classifier head of an imported version, in words: declared, found (and which), or none."""
    manifest = info.manifest
    if manifest.get("head"):
        return f"classifier head {manifest['head']!r} (declared)"
    found = manifest.get("method", {}).get("params", {}).get("head_found")
    if found is None:
        return "no classifier head found: class rounds scoped to the head's row will be refused; declare --head"
    return (f"classifier head {found!r} (found by output width; declare --head if the class logits come "
            f"from another layer)")
