"""Trusting nothing in a version: its serving files must compute what its weights say, and nothing may escape.

A manifest whose hashes match only proves that the files are the ones the manifest names; whoever wrote the
manifest may have written a foreign ``model.pt`` (or ``model.pt2``), NaN weights, or a version directory that
is a symlink to somewhere else. So before a version is served (``daemon.serving.verifier``) or called ok by
``unlearnd registry verify``, ``check_version``:

* refuses a version directory or file that resolves outside the registry (``outside``);
* refuses non-finite weights in ``model.safetensors`` (``nonfinite``);
* rebuilds the model from the manifest (``factory`` + ``model.safetensors``) and refuses any serving file
  (``model.pt``, ``model.pt2``) whose outputs on the probe inputs (``probe_inputs``: the warm-up inputs the
  server also runs) disagree with it beyond ``|a - b| <= ATOL + RTOL * |reference|`` elementwise (``mismatch``);
  a serving file that does not load at all (truncated, not an archive) is ``load``.

Rebuilding runs the factory the manifest names, i.e. code. Only factories the operator trusts are run:
the built-in ones (``daemon.engine.models``, or a built-in ``arch`` in a manifest from before factories) and those whose module is listed in ``$UNLEARND_TRUSTED_FACTORIES``
(comma-separated module names or prefixes ending in ``.``). For any other factory (or none) the reference is
``model.pt`` itself, after its parameters and buffers were checked equal, name by name and bit for bit, to
``model.safetensors``: foreign weights are still refused, foreign code with the same weights is not.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from daemon.registry.layout import (
    EXPORT_FILE,
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    VerificationError,
    VersionInfo,
    _check_inside,
)

__all__ = ["ATOL", "RTOL", "TRUSTED_FACTORIES_ENV", "Checked", "check_version", "factory_trusted",
           "load_pt2", "load_torchscript_bytes", "outputs_agree", "prime", "probe_inputs"]

TRUSTED_FACTORIES_ENV = "UNLEARND_TRUSTED_FACTORIES"
# Traced / exported CPU modules reproduce the eager one to float rounding (a fused kernel summing in another
# order); a foreign model is off by whole logits. The bound is elementwise: |a - b| <= ATOL + RTOL * |ref|.
RTOL = 1e-4
ATOL = 1e-4
_PROBE_ROWS = 4
_BUILTIN_MODULE = "daemon.engine.models"


def probe_inputs(input_shape: tuple[int, int, int]) -> torch.Tensor:
    """The inputs every serving file is checked on: a mid-grey image and three seeded uniform ones, in [0, 1]."""
    gen = torch.Generator().manual_seed(23)
    rows = torch.rand((_PROBE_ROWS - 1, *input_shape), generator=gen, dtype=torch.float32)
    return torch.cat([torch.full((1, *input_shape), 0.5), rows])


def outputs_agree(out: torch.Tensor, reference: torch.Tensor) -> tuple[bool, float]:
    """Whether ``out`` matches ``reference`` within the documented tolerance, and the largest difference."""
    if not isinstance(out, torch.Tensor) or out.shape != reference.shape:
        return False, float("inf")
    out = out.detach().to(torch.float32)
    diff = (out - reference).abs()
    ok = bool(torch.isfinite(out).all()) and bool((diff <= ATOL + RTOL * reference.abs()).all())
    return ok, float(diff.max()) if diff.numel() else 0.0


def factory_trusted(ref: str) -> bool:
    """A built-in factory, or one whose module the operator listed in ``$UNLEARND_TRUSTED_FACTORIES``."""
    module = ref.partition(":")[0]
    if module == _BUILTIN_MODULE:
        return True
    for item in (s.strip() for s in os.environ.get(TRUSTED_FACTORIES_ENV, "").split(",")):
        if item and (module == item or (item.endswith(".") and module.startswith(item))):
            return True
    return False


def prime() -> None:
    """Import what loading a ``model.pt2`` needs (~2.5 s of imports on this machine, once per process), so that a
    server pays it at start-up, before it is ready, not in its first swap."""
    import torch._export.serde.serialize  # noqa: F401
    import torch.export._unlift  # noqa: F401


def load_torchscript_bytes(data: bytes | bytearray) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of an archive's bytes on the CPU, its deprecation warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        module = torch.jit.load(io.BytesIO(bytes(data)), map_location="cpu")
    return module.eval()


def load_pt2(data: bytes | bytearray) -> torch.nn.Module:
    """The callable module of a ``torch.export`` archive (``torch.export.load(...).module()``)."""
    return torch.export.load(io.BytesIO(bytes(data))).module()


@dataclass(frozen=True)
class Checked:
    """What ``check_version`` established: the weights, the probe inputs and the logits every serving
    file must reproduce on them (``reference``), and how the reference was made (``factory`` or ``model.pt``)."""

    state: dict[str, torch.Tensor]
    probe: torch.Tensor
    reference: torch.Tensor
    reference_from: str


def _check_finite(info: VersionInfo, state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise VerificationError(info.model, info.version, STATE_DICT_FILE,
                                        f"tensor {key!r} holds {bad} non-finite value(s) of {value.numel()}",
                                        code="nonfinite")


def _rebuild(manifest: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    from daemon.engine.models import ModelFactory, build_classifier

    ref = manifest.get("factory")
    if not ref and manifest.get("arch"):
        factory = ModelFactory.builtin(manifest["arch"], num_classes=len(manifest["classes"]),
                                       input_shape=manifest["input_shape"])
    else:
        factory = ModelFactory(str(ref), dict(manifest.get("factory_kwargs") or {}))
    channels = int(manifest["input_shape"][0])
    model = build_classifier(factory, mean=[0.0] * channels, std=[1.0] * channels)
    model.load_state_dict(dict(state), strict=True)
    return model.eval()


def _reference_factory(manifest: Mapping[str, Any]) -> str | None:
    ref = manifest.get("factory")
    if isinstance(ref, str) and ref:
        return ref if factory_trusted(ref) else None
    from daemon.engine.models import BUILTIN_FACTORIES

    return _BUILTIN_MODULE if manifest.get("arch") in BUILTIN_FACTORIES else None


def _same_weights(info: VersionInfo, module: torch.nn.Module, state: Mapping[str, torch.Tensor], file: str) -> None:
    """Every tensor of ``state`` is ``module``'s, name by name and bit for bit, and the module has no parameter
    ``state`` lacks (extra buffers are allowed: TorchScript keeps non-persistent ones, which a state dict omits)."""
    own = module.state_dict()
    missing = sorted(set(state) - set(own))
    extra = sorted(set(dict(module.named_parameters())) - set(state))
    if missing or extra:
        raise VerificationError(info.model, info.version, file,
                                f"its tensors are not model.safetensors' (missing {missing[:3]}, "
                                f"unexpected parameters {extra[:3]})", code="mismatch")
    for key, value in state.items():
        if own[key].shape != value.shape or not torch.equal(own[key].to(value.dtype), value):
            raise VerificationError(info.model, info.version, file,
                                    f"tensor {key!r} differs from model.safetensors'", code="mismatch")


def _run(info: VersionInfo, module: Any, probe: torch.Tensor, file: str) -> torch.Tensor:
    try:
        with torch.inference_mode():
            out = module(probe)
    except Exception as exc:  # noqa: BLE001 - the file's own code failed: refuse it with the reason
        raise VerificationError(info.model, info.version, file, f"failed on the probe inputs: "
                                f"{type(exc).__name__}: {exc}", code="load") from exc
    if not isinstance(out, torch.Tensor):
        raise VerificationError(info.model, info.version, file, f"returned {type(out).__name__}, not logits",
                                code="mismatch")
    return out.detach().to(torch.float32)


def check_version(info: VersionInfo, files: Mapping[str, bytes | bytearray], *,
                  registry_dir: Path | str) -> Checked:
    """Everything beyond the hashes (see the module docstring); raises ``VerificationError`` with a ``code``.

    ``files`` holds the verified bytes of ``model.safetensors``, ``model.pt`` and, when listed, ``model.pt2``.
    """
    _check_inside(registry_dir, info.model, info.version, (None, *sorted(info.manifest["files"])))
    manifest = info.manifest
    try:
        state = safetensors.torch.load(bytes(files[STATE_DICT_FILE]))
    except Exception as exc:  # noqa: BLE001 - a malformed safetensors header raises several types
        raise VerificationError(info.model, info.version, STATE_DICT_FILE, f"unreadable: {exc}", code="load") from exc
    _check_finite(info, state)
    try:
        shape = tuple(int(d) for d in manifest["input_shape"])
        if len(shape) != 3:
            raise ValueError(f"input_shape {shape}")
    except (KeyError, TypeError, ValueError) as exc:
        raise VerificationError(info.model, info.version, None, f"manifest lacks a usable input_shape: {exc}") from exc
    probe = probe_inputs(shape)  # type: ignore[arg-type]

    serving = [name for name in (TORCHSCRIPT_FILE, EXPORT_FILE) if name in files]
    loaded: dict[str, Any] = {}
    for name in serving:
        try:
            loaded[name] = load_torchscript_bytes(files[name]) if name == TORCHSCRIPT_FILE else load_pt2(files[name])
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
            raise VerificationError(info.model, info.version, name, f"does not load: {type(exc).__name__}: {exc}",
                                    code="load") from exc

    factory_ref = _reference_factory(manifest)
    if factory_ref is not None:
        try:
            reference = _run(info, _rebuild(manifest, state), probe, STATE_DICT_FILE)
        except VerificationError:
            raise
        except Exception as exc:  # noqa: BLE001 - the weights do not fit the manifest's factory
            raise VerificationError(info.model, info.version, STATE_DICT_FILE,
                                    f"does not rebuild with the manifest's factory: {type(exc).__name__}: {exc}",
                                    code="mismatch") from exc
        reference_from = "factory"
    else:
        first = serving[0]
        _same_weights(info, loaded[first], state, first)
        reference = _run(info, loaded[first], probe, first)
        reference_from = first
    if not bool(torch.isfinite(reference).all()):
        raise VerificationError(info.model, info.version, STATE_DICT_FILE, "the rebuilt model's outputs are not finite",
                                code="nonfinite")
    for name in serving:
        ok, diff = outputs_agree(_run(info, loaded[name], probe, name), reference)
        if not ok:
            raise VerificationError(info.model, info.version, name,
                                    f"outputs disagree with {STATE_DICT_FILE} rebuilt from the manifest "
                                    f"(max abs diff {diff:.3g} > {ATOL} + {RTOL}·|ref|)", code="mismatch")
    return Checked(state=state, probe=probe, reference=reference, reference_from=reference_from)
