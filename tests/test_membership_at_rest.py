"""Issue 23, item 2's measurement: is the registry a membership oracle for forgotten data?

The outside tester's experiment, reproduced: a real round on MNIST forgets ``mnist-train:45000`` and ``:45001``;
for each image, take its penultimate features (the input of ``classifier.1``) under the previous version, keep
the component orthogonal to the previous version's subspace memory, and measure the share of it that the new
version's memory covers (*capture*). The forgotten images are captured whole and 200 never-requested training
images barely at all, so whoever reads the memory can tell them apart. The daemon, which holds the state key,
still sees exactly that (its memory must work); an attacker who reads only what a server reads (the version
folder, no key) cannot load the memory at all and scores both groups the same.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from daemon import keys, registry
from daemon.data.mnist import load_mnist
from daemon.pipeline.config import ModelSection, RoundsSection
from daemon.pipeline.runtime import ModelRuntime
from daemon.registry import model_store
from tests.pipeline_harness import copy_registry, pending_request, request

MODEL = "mnist-cnn"
FORGOTTEN = (45000, 45001)
NEVER = range(46000, 46200)


def _layer(model: torch.nn.Module) -> str:
    return next(n for n, _ in model.named_modules() if n.endswith("classifier.1"))


@torch.no_grad()
def _features(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The inputs of ``layer`` (one row per image) as the memory sees them: float64, with the bias's constant 1."""
    seen: list[torch.Tensor] = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().flatten(1).double()))
    try:
        model.eval()(x)
    finally:
        handle.remove()
    rows = torch.cat(seen)
    return rows if module.bias is None else torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)


def _capture(features: torch.Tensor, before: torch.Tensor | None, after: torch.Tensor | None) -> list[float]:
    """Per row: the share of its component orthogonal to ``before``'s span that ``after``'s span covers."""
    residual = features if before is None or before.numel() == 0 else \
        features - features @ before.double() @ before.double().T
    if after is None or after.numel() == 0:
        return [0.0] * features.shape[0]
    covered = ((residual @ after.double()) ** 2).sum(1)
    return (covered / (residual ** 2).sum(1).clamp_min(1e-30)).tolist()


def _server_readable_memory(info: registry.VersionInfo, layer: str) -> torch.Tensor | None:
    """What an attacker with only the version folder gets of ``layer``'s memory: every file the manifest lists,
    parsed as safetensors where it parses; None when no file holds it."""
    for name in info.manifest["files"]:
        try:
            tensors = st_load((info.path / name).read_bytes())
        except (SafetensorError, ValueError, RuntimeError):
            continue
        if f"subspace/{layer}" in tensors:
            return tensors[f"subspace/{layer}"]
    return None


@pytest.mark.slow
def test_from_what_a_server_reads_a_forgotten_instance_is_not_told_from_a_never_requested_one(tmp_path,
                                                                                            mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    secrets = keys.DaemonKeys(state=keys.load_or_create_key(tmp_path / "keys" / "state.key", "state")[0],
                              ids=keys.load_or_create_key(tmp_path / "keys" / "id.key", "id")[0])
    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-199"), reg,
                           RoundsSection(retention_max_drop=0.5), keys=secrets)
    rt.ensure_model()                                   # v1: pretrained by today's tools, its session in clear
    previous = model_store.load_live(reg, MODEL, rt.version, state_key=secrets.state)
    body = request("forget-two", refs=[f"mnist-train:{i}" for i in FORGOTTEN])
    candidate = rt.run_round([pending_request(rt, body)], should_abort=lambda: False)
    assert candidate.passed, candidate.reason
    new = rt.publish(candidate, "r-000001", {"name": "adv_imp"})
    m = load_mnist()
    layer = _layer(previous.model)
    feats_forgotten = _features(previous.model, layer, m.train_x[list(FORGOTTEN)])
    feats_never = _features(previous.model, layer, m.train_x[NEVER])
    before = previous.session.memory.bases.get(layer)

    # the daemon's view (it holds the key): the leak the tester found, so the memory still does its job
    after = model_store.load_live(reg, MODEL, new.version, state_key=secrets.state).session.memory.bases[layer]
    forgotten, never = _capture(feats_forgotten, before, after), _capture(feats_never, before, after)
    print(f"with the key: forgotten {forgotten}, never-requested max {max(never):.3f} mean "
          f"{sum(never) / len(never):.3f}")
    assert min(forgotten) > 0.95 and min(forgotten) > max(never)

    # the same attacker code on today's layout (the same session written in clear) finds it too
    plain = registry.write_version(reg, MODEL, rt.live.model, input_shape=rt.live.input_shape,
                                   classes=rt.live.classes, parent=new.version, set_latest=False,
                                   extra_files=model_store._session_files(rt.live.session))
    leaked = _server_readable_memory(plain, layer)
    assert leaked is not None and min(_capture(feats_forgotten, before, leaked)) > 0.95

    # what a server reads: the sealed version folder, verified without the key; the memory cannot be loaded
    served = registry.verify_version(reg, MODEL, new.version)
    assert _server_readable_memory(served, layer) is None
    with pytest.raises(model_store.StateKeyError, match="sealed with state key"):
        model_store.load_live(reg, MODEL, new.version)
    seen = _server_readable_memory(served, layer)
    forgotten_attacker = _capture(feats_forgotten, before, seen)
    never_attacker = _capture(feats_never, before, seen)
    assert all(min(never_attacker) <= c <= max(never_attacker) for c in forgotten_attacker)
