"""The live model as the registry keeps it: weights, architecture, and the continual session state.

The architecture is the manifest's ``factory`` ("pkg.module:callable") and ``factory_kwargs``; the
normalisation (``mean``/``std``) is recorded too, though the weights carry it as ``Normalize``'s
buffers. A manifest written before factories names a built-in ``arch`` only and still loads.
Rebuilding imports the factory's module, i.e. runs the operator's code: the factory is only ever
named by the operator (``unlearnd import``, the manifest it wrote), never by a request, and whoever
may write the registry is trusted as much as whoever may run the daemon. (``unlearnd serve`` needs
no factory: it runs the version's TorchScript.)

The engine's session is saved beside each version (``session.safetensors`` for tensors,
``session.json`` for the rest), so a restart — or an operator's rollback — continues exactly
where that version left off. This module is the only glue between ``daemon.registry`` (files) and
``daemon.engine`` (tensors).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from daemon import registry
from daemon.engine.models import BUILTIN_FACTORIES, ModelFactory, Normalize, build_classifier
from daemon.engine.session import UnlearningSession

__all__ = ["LiveModel", "load_live", "manifest_factory", "publish"]

SESSION_TENSORS = "session.safetensors"
SESSION_META = "session.json"


@dataclass
class LiveModel:
    """A model loaded from the registry, ready for more rounds."""

    name: str
    arch: str
    model: nn.Module
    session: UnlearningSession
    info: registry.VersionInfo
    factory: ModelFactory

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.info.manifest["input_shape"])  # type: ignore[return-value]

    @property
    def classes(self) -> list[str]:
        return list(self.info.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _session_files(session: UnlearningSession) -> dict[str, bytes]:
    tensors, meta = session.state()
    return {SESSION_TENSORS: st_save(tensors), SESSION_META: json.dumps(meta, sort_keys=True).encode()}


def manifest_factory(manifest: Mapping[str, Any], where: str) -> ModelFactory:
    """The factory a manifest records; a manifest from before factories names a built-in ``arch`` instead."""
    ref = manifest.get("factory")
    if ref:
        kwargs = manifest.get("factory_kwargs") or {}
        if not isinstance(ref, str) or not isinstance(kwargs, dict):
            raise registry.RegistryError(f"{where}: the manifest's factory/factory_kwargs are malformed")
        return ModelFactory(ref, kwargs)
    arch = manifest.get("arch")
    if not arch:
        raise registry.RegistryError(f"{where}: the manifest names no factory nor arch; cannot rebuild it")
    try:
        return ModelFactory.builtin(arch, num_classes=len(manifest["classes"]), input_shape=manifest["input_shape"])
    except ValueError as exc:
        raise registry.RegistryError(f"{where}: {exc}") from exc


def _spec_manifest(registry_dir: Path, name: str, model: nn.Module, *, factory: ModelFactory | None,
                   arch: str | None, parent: int | None, input_shape: Sequence[int],
                   classes: Sequence[str]) -> dict[str, Any]:
    """The manifest keys that let any process rebuild ``model``: factory, kwargs, arch, mean and std.

    The factory is the one given, else the parent version's (a round never changes the architecture),
    else the built-in ``arch``'s.
    """
    if factory is None and parent is not None:
        factory = manifest_factory(registry.read_manifest(registry_dir, name, parent), f"{name} v{parent}")
    if factory is None:
        if not arch:
            raise ValueError("publish needs a factory, a parent version, or a built-in arch")
        factory = ModelFactory.builtin(arch, num_classes=len(classes), input_shape=input_shape)
    if arch is None:
        arch = next((a for a, ref in BUILTIN_FACTORIES.items() if ref == factory.ref), factory.name)
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    stats = {} if norm is None else {"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}
    return {"arch": arch, "factory": factory.ref, "factory_kwargs": dict(factory.kwargs), **stats}


def publish(
    registry_dir: Path,
    name: str,
    model: nn.Module,
    session: UnlearningSession,
    *,
    input_shape: Sequence[int],
    classes: Sequence[str],
    parent: int | None,
    arch: str | None = None,
    factory: ModelFactory | None = None,
    dataset: str | None = None,
    round_id: str | None = None,
    request_ids: Sequence[str] = (),
    method: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> registry.VersionInfo:
    """Write the model and its session as the next version (atomic; ``LATEST`` moves last)."""
    spec = _spec_manifest(registry_dir, name, model, factory=factory, arch=arch, parent=parent,
                          input_shape=input_shape, classes=classes)
    return registry.write_version(
        registry_dir, name, model, input_shape=tuple(input_shape), classes=list(classes), parent=parent,
        round_id=round_id, request_ids=list(request_ids), method=dict(method or {}), metrics=dict(metrics or {}),
        extra_files=_session_files(session),
        extra_manifest={**spec, "dataset": dataset}, label_file=True,
    )


def load_live(registry_dir: Path, name: str, version: int | None = None, *, device: str = "cpu") -> LiveModel:
    """Rebuild the eager model from its manifest's factory, its weights and its session from a verified version."""
    state, info = registry.load_state_dict(registry_dir, name, version)
    manifest = info.manifest
    factory = manifest_factory(manifest, f"{name} v{info.version}")
    classes = list(manifest["classes"])
    channels = manifest["input_shape"][0]
    model = build_classifier(factory, mean=[0.0] * channels, std=[1.0] * channels)
    model.load_state_dict(state, strict=True)   # normalisation statistics come with the buffers
    model.to(device).eval()
    if SESSION_TENSORS in manifest["files"]:
        tensors = st_load(registry.read_extra_file(info, SESSION_TENSORS))
        meta = json.loads(registry.read_extra_file(info, SESSION_META))
        session = UnlearningSession.restore(model, tensors, meta)
    else:
        session = UnlearningSession(model, num_classes=len(classes))
    arch = manifest.get("arch") or factory.name
    return LiveModel(name=name, arch=arch, model=model, session=session, info=info, factory=factory)
