"""Exporting a module for serving: TorchScript (checked against the eager module, with a cache of recent
traces) and Triton's ``config.pbtxt``.
"""

from __future__ import annotations

import copy
import io
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from daemon.registry.archive import copy_storages, read_layout
from daemon.registry.files import _atomic_write_bytes
from daemon.registry.layout import CONFIG_FILE, LABELS_FILE

DEFAULT_MAX_BATCH_SIZE = 256
# The traced module must reproduce the eager one; CPU TorchScript is normally bit-exact, the tolerance
# only absorbs a fused kernel summing in a different order.
_TRACE_RTOL = 1e-5
_TRACE_ATOL = 1e-6


# The export cache: tracing a module (~15 ms of CPU for a small CNN, much more for a deep net) and loading
# its TorchScript back for the check (~8 ms) are most of a publish, and a continual-unlearning daemon
# publishes the same architecture with new weights round after round. So the last few exports are kept,
# keyed by the module's structure (``_structure_key``): the traced module, and the module loaded back from
# its saved archive with that archive's layout signature (``daemon.registry.archive``). An export of a
# module with the same structure copies the new weights into the cached trace instead of tracing again,
# and, when the saved archive has the cached one's layout signature (so loading it is the same as copying
# its storages into the module loaded before: the argument the server's weight-only swaps rest on), copies
# the archive's storages into the cached loaded-back module instead of loading it again. Every check runs
# as before on the result: eager, traced and saved-and-loaded outputs must agree on the probe batch. A cached
# export that fails a check is dropped and the export is redone from scratch, so the cache never makes an
# export fail (or pass) that a fresh one would not.
_EXPORT_CACHE_SIZE = 2
_HOOK_ATTRS = re.compile(r"_.*hooks.*")
_PLAIN_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class _CachedExport:
    traced: torch.jit.ScriptModule
    reloaded: torch.jit.ScriptModule | None = None   # loaded back from an archive with ``signature``
    signature: str | None = None
    tensors: dict[str, torch.Tensor] | None = None   # the trace's parameters and buffers by name


_export_cache: OrderedDict[tuple[Any, ...], _CachedExport] = OrderedDict()
_export_lock = threading.Lock()


def _plain_key(value: Any) -> Any:
    """A hashable stand-in for a plain attribute value; raises ``TypeError`` for anything else."""
    if isinstance(value, _PLAIN_TYPES):
        return (type(value), value)
    if isinstance(value, (tuple, list, frozenset, set)):
        items = sorted(value, key=repr) if isinstance(value, (frozenset, set)) else value
        return (type(value), tuple(_plain_key(v) for v in items))
    raise TypeError(type(value).__name__)


def _tensor_key(tensor: torch.Tensor | None) -> Any:
    if tensor is None:
        return None
    return (tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device.type, tensor.requires_grad,
            type(tensor))


def _structure_key(module: nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> tuple[Any, ...] | None:
    """What a trace of ``module`` depends on besides its tensors' values, or ``None`` (never cache it).

    Per submodule: its path, its class (the very class object: same code), every attribute of its instance
    (plain values only: numbers, strings, dtypes and tuples of them, e.g. a convolution's stride and its
    training flag), the names, shapes, strides, dtypes of its parameters and buffers. Anything else on an
    instance (a plain tensor attribute, which a trace bakes in as a constant; a function; a hook; a
    ScriptModule) makes the module uncacheable, as do global module hooks.
    """
    from torch.nn.modules import module as module_mod

    if isinstance(module, torch.jit.ScriptModule):
        return None
    if any(getattr(module_mod, name, None) for name in (
            "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
            "_global_backward_hooks")):
        return None
    parts: list[Any] = [tuple(input_shape), num_classes]
    try:
        for path, sub in module.named_modules(remove_duplicate=False):
            attrs: list[Any] = []
            for name, value in sorted(vars(sub).items()):
                if name in ("_parameters", "_buffers"):
                    attrs.append((name, tuple((k, _tensor_key(v)) for k, v in value.items())))
                elif name == "_modules":
                    attrs.append((name, tuple((k, type(v)) for k, v in value.items())))
                elif _HOOK_ATTRS.fullmatch(name) and isinstance(value, dict):
                    if value:
                        return None
                else:
                    attrs.append((name, _plain_key(value)))
            parts.append((path, type(sub), tuple(attrs)))
    except TypeError:
        return None
    return tuple(parts)


def _copy_weights(source: nn.Module, cached: _CachedExport) -> bool:
    """Copy every parameter and buffer of ``source`` into the same-named one of the cached trace."""
    src = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    if cached.tensors is None:      # walking a ScriptModule's attributes is slow: once per trace
        traced = cached.traced
        cached.tensors = {**dict(traced.named_parameters()), **dict(traced.named_buffers())}
    dst = cached.tensors
    if set(src) != set(dst) or any(src[k].shape != dst[k].shape or src[k].dtype != dst[k].dtype for k in src):
        return False
    with torch.no_grad():
        for key, value in src.items():
            dst[key].copy_(value)
    return True


def _export(module: nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> tuple[bytes, bytes]:
    """Serialise a CPU copy of ``module``: (TorchScript bytes, safetensors bytes).

    The copy is what gets exported, so the caller's module keeps its device, mode and parameters.
    The TorchScript is checked twice against the eager copy, once traced and once after a save/load
    round trip, on a batch of 2 (which also catches a batch size baked in by the trace). The trace and the
    loaded-back module may come from the export cache (see above).
    """
    with _export_lock:
        try:
            ts_bytes = _export_torchscript(module, input_shape, num_classes, use_cache=True)
        except _CachedExportFailed:
            ts_bytes = _export_torchscript(module, input_shape, num_classes, use_cache=False)

    state: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        # clone: safetensors refuses shared storage; contiguous: it stores dense row-major data.
        state[key] = value.detach().to("cpu").contiguous().clone()
    return ts_bytes, safetensors.torch.save(state, metadata={"format": "pt"})


class _CachedExportFailed(Exception):
    """A check failed on a cached trace or loaded-back module: redo the export without the cache."""


def _export_torchscript(module: nn.Module, input_shape: tuple[int, int, int], num_classes: int, *,
                        use_cache: bool) -> bytes:

    probe = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        if isinstance(module, torch.jit.ScriptModule):
            # A save/load round trip is the clean way to copy a ScriptModule onto the CPU.
            buffer = io.BytesIO()
            torch.jit.save(module, buffer)
            cpu: nn.Module = torch.jit.load(io.BytesIO(buffer.getvalue()), map_location="cpu").eval()
        else:
            cpu = copy.deepcopy(module).to("cpu").eval()
        expected = cpu(probe)
        if not isinstance(expected, torch.Tensor) or tuple(expected.shape) != (2, num_classes):
            got = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected).__name__
            raise ValueError(f"module must map (N, {', '.join(map(str, input_shape))}) inputs to "
                             f"(N, {num_classes}) logits, got {got}")
        key = _structure_key(cpu, input_shape, num_classes)
        cached = _export_cache.pop(key, None) if key is not None else None
        from_cache = False
        if isinstance(cpu, torch.jit.ScriptModule):
            scripted: torch.jit.ScriptModule = cpu
        elif use_cache and cached is not None and _copy_weights(cpu, cached):
            scripted = cached.traced
            from_cache = True
        else:
            scripted = torch.jit.trace(cpu, torch.zeros((1, *input_shape)), check_trace=False)
            cached = _CachedExport(scripted) if key is not None else None
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        ts_bytes = buffer.getvalue()
        reloaded: torch.jit.ScriptModule | None = None
        layout = read_layout(ts_bytes) if cached is not None else None
        if (use_cache and cached is not None and layout is not None and cached.reloaded is not None
                and cached.signature == layout.signature):
            try:
                copy_storages(cached.reloaded, layout, ts_bytes)
                reloaded = cached.reloaded
                from_cache = True
            except Exception:  # noqa: BLE001 - the archive's entries did not read back: load it in full
                cached.reloaded = cached.signature = None
        if reloaded is None:
            reloaded = torch.jit.load(io.BytesIO(ts_bytes), map_location="cpu")
            if cached is not None and layout is not None:
                cached.reloaded, cached.signature = reloaded, layout.signature
        for label, candidate in (("traced", scripted), ("saved", reloaded)):
            out = candidate(probe)
            if not torch.allclose(out, expected, rtol=_TRACE_RTOL, atol=_TRACE_ATOL):
                if from_cache:
                    raise _CachedExportFailed(label)      # the entry stays out of the cache
                diff = (out - expected).abs().max().item()
                raise ValueError(f"the {label} TorchScript module disagrees with the eager module "
                                 f"(max abs diff {diff:.3g}); the module may need torch.jit.script")
        if key is not None and cached is not None:
            _export_cache[key] = cached
            while len(_export_cache) > _EXPORT_CACHE_SIZE:
                _export_cache.popitem(last=False)
    return ts_bytes


def _export_pt2(module: nn.Module, input_shape: tuple[int, int, int]) -> tuple[bytes | None, str | None]:
    """A ``torch.export`` archive of a CPU copy of ``module`` with a dynamic batch dimension, checked against
    the eager copy after a save/load round trip: (bytes, None), or (None, why) when the model does not export.

    TorchScript is deprecated (torch 2.13's ``torch.jit.load`` warns); ``model.pt2`` is its successor, and the
    server prefers it. A model ``torch.export`` cannot capture (data-dependent control flow, unsupported
    Python) still publishes, with ``model.pt`` alone.
    """
    from daemon.registry.trust import load_pt2, outputs_agree, probe_inputs

    if isinstance(module, torch.jit.ScriptModule):
        return None, "a TorchScript module cannot be exported with torch.export"
    probe = probe_inputs(input_shape)
    try:
        cpu = copy.deepcopy(module).to("cpu").eval()
        with torch.no_grad():
            expected = cpu(probe)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(cpu, (torch.zeros((2, *input_shape)),), dynamic_shapes=({0: batch},))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        data = buffer.getvalue()
        with torch.no_grad():
            got = load_pt2(data)(probe)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types for a model it cannot capture
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
    ok, diff = outputs_agree(got, expected.detach().float())
    if not ok:
        return None, f"the exported program disagrees with the eager module (max abs diff {diff:.3g})"
    return data, None


def _triton_config(model_name: str, input_shape: tuple[int, int, int], num_classes: int,
                   max_batch_size: int, *, label_file: bool = False) -> bytes:
    """Triton's model configuration; the default version policy serves the newest version.

    With ``label_file`` the output names ``labels.txt`` (one class name per line, beside this file),
    which Triton's classification extension reads to answer ``score:index:label``.
    """
    dims = ", ".join(str(d) for d in input_shape)
    labels = f'    label_filename: "{LABELS_FILE}"\n' if label_file else ""
    return (
        f'name: "{model_name}"\n'
        'platform: "pytorch_libtorch"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        '    name: "INPUT__0"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {dims} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        '    name: "OUTPUT__0"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {num_classes} ]\n"
        f"{labels}"
        "  }\n"
        "]\n"
    ).encode("ascii")


def _labels(classes: Sequence[str]) -> bytes:
    """Triton's label file: one class name per line, in logit order."""
    for name in classes:
        if "\n" in name or "\r" in name:
            raise ValueError(f"class name {name!r} holds a line break; a label file cannot carry it")
    return "".join(f"{name}\n" for name in classes).encode("utf-8")


def _write_config(model_dir: Path, content: bytes, name: str = CONFIG_FILE) -> None:
    """Write a model-level file (``config.pbtxt``, ``labels.txt``) only when its content changed."""
    path = model_dir / name
    try:
        if path.read_bytes() == content:
            return
    except FileNotFoundError:
        pass
    _atomic_write_bytes(path, content)
