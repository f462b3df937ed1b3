"""The live model as the registry keeps it: weights, architecture, and the continual session state.

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
from daemon.engine.models import build_model
from daemon.engine.session import UnlearningSession

__all__ = ["LiveModel", "load_live", "publish"]

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


def publish(
    registry_dir: Path,
    name: str,
    model: nn.Module,
    session: UnlearningSession,
    *,
    arch: str,
    input_shape: Sequence[int],
    classes: Sequence[str],
    parent: int | None,
    dataset: str | None = None,
    round_id: str | None = None,
    request_ids: Sequence[str] = (),
    method: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> registry.VersionInfo:
    """Write the model and its session as the next version (atomic; ``LATEST`` moves last)."""
    return registry.write_version(
        registry_dir, name, model, input_shape=tuple(input_shape), classes=list(classes), parent=parent,
        round_id=round_id, request_ids=list(request_ids), method=dict(method or {}), metrics=dict(metrics or {}),
        extra_files=_session_files(session),
        extra_manifest={"arch": arch, "dataset": dataset},
    )


def load_live(registry_dir: Path, name: str, version: int | None = None, *, device: str = "cpu") -> LiveModel:
    """Rebuild the eager model, its weights and its session from a verified version."""
    state, info = registry.load_state_dict(registry_dir, name, version)
    manifest = info.manifest
    arch = manifest.get("arch")
    if not arch:
        raise registry.RegistryError(f"{name} v{info.version}: the manifest names no arch; cannot rebuild it")
    shape = tuple(manifest["input_shape"])
    classes = list(manifest["classes"])
    channels = shape[0]
    model = build_model(arch, num_classes=len(classes), input_shape=shape,
                        mean=[0.0] * channels, std=[1.0] * channels)
    model.load_state_dict(state, strict=True)   # normalisation statistics come with the buffers
    model.to(device).eval()
    if SESSION_TENSORS in manifest["files"]:
        tensors = st_load(registry.read_extra_file(info, SESSION_TENSORS))
        meta = json.loads(registry.read_extra_file(info, SESSION_META))
        session = UnlearningSession.restore(model, tensors, meta)
    else:
        session = UnlearningSession(model, num_classes=len(classes))
    return LiveModel(name=name, arch=arch, model=model, session=session, info=info)
