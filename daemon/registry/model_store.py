"""The live model as the registry keeps it: weights, architecture, and the continual session state.

The architecture is the manifest's ``factory`` ("pkg.module:callable") and ``factory_kwargs``; its
``head`` (when the operator declared one) names the classifier head in the operator's module; the
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

The session is a membership oracle in clear (its subspace memory spans the features of exactly the
instances its rounds forgot: issue 23), so with a state key (:mod:`daemon.keys`) both files are sealed
with AES-256-GCM, the authenticated data naming the model, the version and the file; the manifest's
``state_seal`` records the algorithm, the key id, the files and the version they were sealed for (a
rollback copies them: its ``rollback.to`` is that version or a later one). The manifest's sha256 covers the
ciphertext, so servers verify a version without the key. A version written before sealing (or without a
key) is read in clear once; the next version the daemon writes is sealed.
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

from daemon import keys, registry
from daemon.engine.heads import find_head
from daemon.engine.models import (
    BUILTIN_FACTORIES,
    ModelFactory,
    Normalize,
    backbone_module_name,
    build_classifier,
    classifier_module_name,
)
from daemon.engine.session import UnlearningSession
from daemon.registry import lineage

__all__ = ["HeadError", "LiveModel", "StateKeyError", "check_head", "load_live", "manifest_factory", "manifest_head",
           "publish", "session_files"]

SESSION_TENSORS = "session.safetensors"
SESSION_META = "session.json"
STATE_SEAL = "state_seal"           # the manifest key that says the session files are sealed, and how
SEAL_ALG = "AES-256-GCM"


class StateKeyError(registry.RegistryError):
    """A version's continual state cannot be opened: no key, another key, or a sealed file altered or moved."""


class HeadError(registry.RegistryError):
    """The declared classifier head is not one of the model's, or the setting and the manifest disagree."""


@dataclass
class LiveModel:
    """A model loaded from the registry, ready for more rounds."""

    name: str
    arch: str
    model: nn.Module
    session: UnlearningSession
    info: registry.VersionInfo
    factory: ModelFactory
    head: str | None = None     # the declared head, as the operator's module names it (None: found per round)

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


def _state_aad(model: str, version: int, file: str) -> bytes:
    """What a sealed session file is bound to: a ciphertext opens only as this file of this model's version."""
    return b"\0".join([b"unlearnd.state/v1", model.encode("utf-8"), str(version).encode("ascii"),
                        file.encode("utf-8")])


def _sealer(model: str, session: UnlearningSession, key: keys.SecretKey) -> registry.Sealer:
    """The session files sealed for the version number the registry picks (see ``write_version``)."""
    plain = _session_files(session)

    def sealed(version: int) -> tuple[dict[str, bytes], dict[str, Any]]:
        files = {name: keys.seal(key, data, _state_aad(model, version, name)) for name, data in plain.items()}
        return files, {STATE_SEAL: {"alg": SEAL_ALG, "key_id": key.key_id, "files": sorted(files),
                                    "version": version}}
    return sealed


def session_files(info: registry.VersionInfo, state_key: keys.SecretKey | None) -> dict[str, bytes] | None:
    """A version's session files in clear (verified against the manifest, opened with ``state_key`` when
    sealed), or None when it has none. Raises :class:`StateKeyError` saying what is wrong and the fix."""
    manifest, where = info.manifest, f"{info.model} v{info.version}"
    if SESSION_TENSORS not in manifest["files"]:
        return None
    raw = {n: registry.read_extra_file(info, n) for n in (SESSION_TENSORS, SESSION_META)}
    seal = manifest.get(STATE_SEAL)
    if seal is None:
        return raw          # written before sealing (or without a key): read in clear, sealed from the next version
    if not isinstance(seal, dict) or seal.get("alg") != SEAL_ALG or not isinstance(seal.get("version"), int):
        raise StateKeyError(f"{where}: the manifest's {STATE_SEAL} is malformed: {seal!r}")
    sealed_for = seal["version"]
    rollback_to = (manifest.get("rollback") or {}).get("to")
    if sealed_for != info.version and not (isinstance(rollback_to, int) and sealed_for <= rollback_to):
        raise StateKeyError(f"{where}: its session files were sealed for version {sealed_for} and it is no "
                            f"rollback to it: refusing another version's continual state")
    if state_key is None:
        raise StateKeyError(f"{where}: its continual state is sealed with state key {seal.get('key_id')}; "
                            f"configure that key (keys.state_key_file) to resume from it")
    try:
        return {n: keys.open_sealed(state_key, data, _state_aad(info.model, sealed_for, n), f"{where} {n}")
                for n, data in raw.items()}
    except keys.SealError as exc:
        raise StateKeyError(str(exc)) from None


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


def manifest_head(manifest: Mapping[str, Any], where: str) -> str | None:
    """The classifier head a manifest declares (a module name of the operator's module), or None."""
    head = manifest.get("head")
    if head is not None and (not isinstance(head, str) or not head):
        raise registry.RegistryError(f"{where}: the manifest's head must be a module name, got {head!r}")
    return head


def check_head(model: nn.Module, num_classes: int, head: str, where: str) -> str:
    """``head`` (named in the operator's module) as the engine names it in ``model``; ValueError naming the fix."""
    try:
        return find_head(model, num_classes, head=classifier_module_name(head)).name
    except ValueError:
        fits = [backbone_module_name(n) for n, m in model.named_modules()
                if backbone_module_name(n) is not None
                and ((isinstance(m, nn.Linear) and m.out_features == num_classes)
                     or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes))]
        raise ValueError(f"{where}: the classifier head {head!r} is not an nn.Linear with {num_classes} outputs "
                         f"(nor an nn.Conv2d with {num_classes} output channels) of the model; name it as the "
                         f"model's own named_modules() does (modules that fit: {fits or 'none'})") from None


def _spec_manifest(registry_dir: Path, name: str, model: nn.Module, *, factory: ModelFactory | None,
                   arch: str | None, parent: int | None, input_shape: Sequence[int],
                   classes: Sequence[str], head: str | None) -> dict[str, Any]:
    """The manifest keys that let any process rebuild ``model``: factory, kwargs, arch, head, mean and std.

    The factory (and the head) are the ones given, else the parent version's (a round never changes the
    architecture), else the built-in ``arch``'s.
    """
    if parent is not None and (factory is None or head is None):
        parent_manifest = registry.read_manifest(registry_dir, name, parent)
        factory = factory or manifest_factory(parent_manifest, f"{name} v{parent}")
        head = head or manifest_head(parent_manifest, f"{name} v{parent}")
    if factory is None:
        if not arch:
            raise ValueError("publish needs a factory, a parent version, or a built-in arch")
        factory = ModelFactory.builtin(arch, num_classes=len(classes), input_shape=input_shape)
    if arch is None:
        arch = next((a for a, ref in BUILTIN_FACTORIES.items() if ref == factory.ref), factory.name)
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    stats = {} if norm is None else {"mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist()}
    return {"arch": arch, "factory": factory.ref, "factory_kwargs": dict(factory.kwargs), "head": head, **stats}


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
    head: str | None = None,
    dataset: str | None = None,
    round_id: str | None = None,
    request_ids: Sequence[str] = (),
    method: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    instances: int = 0,
    parent_deletions: int | None = None,
    state_key: keys.SecretKey | None = None,
    owner_epoch: int | None = None,
    set_latest: bool = True,
) -> registry.VersionInfo:
    """Write the model and its session as the next version (atomic; ``LATEST`` moves last). ``head``: the
    declared classifier head (the operator's module name), else the parent's.

    ``owner_epoch``: the daemon's ownership epoch of the model (issue 24), recorded in the manifest so a stale
    owner can see a newer one published; ``set_latest=False`` leaves ``LATEST`` to the caller (the daemon checks
    its ownership once more just before moving it).

    The manifest records ``deletions_since_base`` (:mod:`daemon.registry.lineage`): 0 for a base (``method.name``
    pretrain, import or rebase, or no parent), else the parent's count plus ``instances``, the instances this
    version's round unlearned. ``parent_deletions`` is the parent's count when the caller holds it (the daemon
    does); without it, it is read from the registry. ``state_key``: seal the session files with it (the daemon
    always does); without one they are written in clear (a fresh import's empty session, offline tools).
    """
    if instances < 0:
        raise ValueError(f"instances must be >= 0, got {instances}")
    spec = _spec_manifest(registry_dir, name, model, factory=factory, arch=arch, parent=parent,
                          input_shape=input_shape, classes=classes, head=head)
    if parent is None or lineage.is_base({"method": dict(method or {}), "parent": parent}):
        deletions = 0
    else:
        if parent_deletions is None:
            parent_deletions = lineage.deletions_since_base(registry_dir, name, parent).deletions
        deletions = parent_deletions + instances
    return registry.write_version(
        registry_dir, name, model, input_shape=tuple(input_shape), classes=list(classes), parent=parent,
        round_id=round_id, request_ids=list(request_ids), method=dict(method or {}), metrics=dict(metrics or {}),
        extra_files=_session_files(session) if state_key is None else None,
        sealed_files=None if state_key is None else _sealer(name, session, state_key),
        extra_manifest={**spec, "dataset": dataset, lineage.DELETIONS_KEY: deletions,
                        **({} if owner_epoch is None else {"owner_epoch": int(owner_epoch)})},
        label_file=True, set_latest=set_latest,
    )


def load_model(registry_dir: Path, name: str, version: int | None = None, *, device: str = "cpu"
               ) -> tuple[nn.Module, registry.VersionInfo, ModelFactory]:
    """The eager model of a verified version (its manifest's factory, its weights), without its session: what an
    auditor or a tool that only evaluates needs (no state key, no continual state)."""
    state, info = registry.load_state_dict(registry_dir, name, version)
    factory = manifest_factory(info.manifest, f"{name} v{info.version}")
    channels = info.manifest["input_shape"][0]
    model = build_classifier(factory, mean=[0.0] * channels, std=[1.0] * channels)
    model.load_state_dict(state, strict=True)   # normalisation statistics come with the buffers
    return model.to(device).eval(), info, factory


def load_live(registry_dir: Path, name: str, version: int | None = None, *, device: str = "cpu",
              head: str | None = None, state_key: keys.SecretKey | None = None) -> LiveModel:
    """Rebuild the eager model from its manifest's factory, its weights and its session from a verified version.

    ``head``: the operator's declared classifier head (config or command line); it must agree with the one
    the manifest declares, if any — the head belongs to the model, and two answers mean a mistake.
    ``state_key``: the key that sealed the version's session files (:class:`StateKeyError` without it).
    """
    model, info, factory = load_model(registry_dir, name, version, device=device)
    manifest = info.manifest
    where = f"{name} v{info.version}"
    declared = manifest_head(manifest, where)
    if head is not None and declared is not None and head != declared:
        raise HeadError(f"{where}: the head setting {head!r} differs from the head {declared!r} its "
                        f"manifest declares (unlearnd import --head); drop the setting or fix it")
    head = head or declared
    classes = list(manifest["classes"])
    engine_head = None
    if head is not None:
        try:
            engine_head = check_head(model, len(classes), head, where)
        except ValueError as exc:
            raise HeadError(str(exc)) from None
    files = session_files(info, state_key)
    if files is not None:
        tensors = st_load(files[SESSION_TENSORS])
        meta = json.loads(files[SESSION_META])
        session = UnlearningSession.restore(model, tensors, meta, head=engine_head)
    else:
        session = UnlearningSession(model, num_classes=len(classes), head=engine_head)
    arch = manifest.get("arch") or factory.name
    return LiveModel(name=name, arch=arch, model=model, session=session, info=info, factory=factory, head=head)
