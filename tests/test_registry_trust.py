"""A registry that trusts nothing (issue 23): what a server and ``unlearnd registry verify`` refuse beyond the hashes.

Each fault is made the way an outside tester made it: the manifest rewritten to agree with the changed file, so
only the deeper checks (``daemon.registry.trust``, the watcher's ``LATEST`` rule) can catch it. The model is the
built-in MNIST CNN, so the reference is rebuilt from the manifest's factory.

Tests that take the ``store`` fixture run on both engines (tests/registry_stores.py): the fault is made in what the
store holds (a folder, or a bucket a server pulls from) and the server, or ``unlearnd registry verify``, reads it
there. Symlinks exist only in a folder; the writer-side checks (export, factories, rollback's own refusal) are the
folder's too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from torch import nn

from daemon import registry
from daemon.cli import main
from daemon.engine.models import ModelFactory, build_classifier
from daemon.registry import ops as registry_ops
from daemon.registry import trust
from daemon.serving.holder import ModelHolder
from daemon.serving.metrics import ServeMetrics
from daemon.serving.watcher import Watcher
from tests.registry_stores import RegistryStore

NAME = "cnn"
SHAPE = (1, 28, 28)
CLASSES = [str(i) for i in range(10)]
FACTORY = ModelFactory.builtin("mnist_cnn", num_classes=10, input_shape=list(SHAPE))
X = torch.rand((3, *SHAPE), generator=torch.Generator().manual_seed(5))


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_classifier(FACTORY, mean=[0.1307], std=[0.3081]).eval()


def publish(reg: Path, seed: int, *, pt2: bool = True) -> registry.VersionInfo:
    return registry.write_version(reg, NAME, model(seed), input_shape=SHAPE, classes=CLASSES,
                                  parent=registry.latest_version(reg, NAME), export_pt2=pt2,
                                  extra_manifest={"factory": FACTORY.ref, "factory_kwargs": dict(FACTORY.kwargs)})


def rehash(info: registry.VersionInfo, name: str) -> None:
    """Make the manifest agree with a file that was changed: the hashes then say nothing."""
    path = info.path / registry.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    data = (info.path / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if name == registry.STATE_DICT_FILE:
        manifest["sha256"] = manifest["files"][name]["sha256"]
    path.write_text(json.dumps(manifest))


def verify_cli(store: RegistryStore, *args: str) -> int:
    return main(["registry", "verify", *store.cli_args(), "--model", NAME, *args])


def holder(reg: Path) -> tuple[ModelHolder, ServeMetrics]:
    metrics = ServeMetrics(CollectorRegistry())
    return ModelHolder(reg, NAME, metrics=metrics), metrics


def failures(metrics: ServeMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("unlearnd_serve_load_failures_total", {"reason": reason}) or 0.0


def expected(info: registry.VersionInfo, x: torch.Tensor) -> torch.Tensor:
    state = safetensors.torch.load_file(info.path / registry.STATE_DICT_FILE)
    m = build_classifier(FACTORY, mean=[0.0], std=[1.0])
    m.load_state_dict(state)
    with torch.no_grad():
        return m.eval()(x)


def verify_codes(reg: Path) -> dict[int, str | None]:
    return {r.version: r.code for r in registry_ops.verify_all(reg, NAME)}


@pytest.fixture()
def reg(tmp_path: Path) -> Path:
    return tmp_path / "registry"


# -- LATEST only moves forward ------------------------------------------------------------------------
def test_latest_moved_backwards_is_refused_and_the_newer_version_keeps_serving(store: RegistryStore) -> None:
    for seed in range(3):
        publish(store.root, seed, pt2=False)
    store.publish(NAME)
    cache, sync = store.server_cache(NAME)
    h, metrics = holder(cache)
    watcher = Watcher(h, server_id="srv-a", sync=sync)
    assert watcher.check().outcome == "swapped" and h.current.version == 3
    store.move_latest(NAME, 1)                                  # moved back by hand
    with capture_logs() as logs:
        for force in (False, False, True):                     # polls and an explicit reload: all refused
            result = watcher.check(force=force)
            assert result.outcome == "failed" and result.error.reason == "backwards"
            assert "registry rollback --to 1" in result.error.detail
    assert h.current.version == 3 and failures(metrics, "backwards") == 1   # counted and logged once
    assert [e["reason"] for e in logs if e["event"] == "version_refused"] == ["backwards"]
    # a restarted server knows how far LATEST had got from the leases in the registry (on S3: in its cache)
    fresh, fresh_metrics = holder(cache)
    assert Watcher(fresh, server_id="srv-b", sync=sync).check().error.reason == "backwards" and fresh.current is None
    assert "went backwards" in str(registry_ops.check_latest(cache, NAME))


def test_rollback_is_a_new_version_that_servers_follow(store: RegistryStore,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    first = publish(store.root, 0, pt2=False)
    publish(store.root, 1, pt2=False)
    store.publish(NAME)
    cache, sync = store.server_cache(NAME)
    h, _ = holder(cache)
    watcher = Watcher(h, sync=sync)
    watcher.check()
    store.move_latest(NAME, 1)
    assert watcher.check().error.reason == "backwards"
    assert verify_cli(store) == 1
    assert "LATEST: FAILED (backwards)" in capsys.readouterr().out
    assert main(["registry", "rollback", *store.cli_args(), "--model", NAME, "--to", "1"]) == 0
    assert watcher.check().outcome == "swapped" and h.current.version == 3
    assert h.current.sha256 == first.sha256 and torch.allclose(h.current.infer(X), expected(first, X), atol=1e-5)
    assert registry.read_manifest(store.view(NAME), NAME, 3)["rollback"]["to"] == 1
    assert verify_cli(store) == 0


# -- nothing outside the registry ---------------------------------------------------------------------
@pytest.mark.parametrize("what", ["version directory", "file"])
def test_a_symlink_out_of_the_registry_is_refused(tmp_path: Path, reg: Path, what: str) -> None:
    publish(reg, 0, pt2=False)
    outside = tmp_path / "elsewhere"
    publish(outside, 0, pt2=False)
    foreign = publish(outside, 1, pt2=False)                  # a whole, self-consistent version 2
    if what == "version directory":
        (reg / NAME / "2").symlink_to(foreign.path, target_is_directory=True)
    else:
        shutil.copytree(foreign.path, reg / NAME / "2")
        (reg / NAME / "2" / registry.STATE_DICT_FILE).unlink()
        (reg / NAME / "2" / registry.STATE_DICT_FILE).symlink_to(foreign.path / registry.STATE_DICT_FILE)
    h, metrics = holder(reg)
    assert h.swap_to(1).outcome == "swapped"
    result = h.swap_to(2)
    assert result.outcome == "failed" and result.error.reason == "outside"
    assert "resolves outside the registry" in result.error.detail and h.current.version == 1
    assert failures(metrics, "outside") == 1
    assert verify_codes(reg) == {1: None, 2: "outside"}


# -- serving files that compute what the weights say ----------------------------------------------------
def test_a_foreign_model_pt_with_a_consistent_manifest_is_refused(tmp_path: Path, store: RegistryStore,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    publish(store.root, 0, pt2=False)
    bad = publish(store.root, 1, pt2=False)
    other = publish(tmp_path / "other", 7, pt2=False)     # same architecture, other weights
    shutil.copyfile(other.path / registry.TORCHSCRIPT_FILE, bad.path / registry.TORCHSCRIPT_FILE)
    rehash(bad, registry.TORCHSCRIPT_FILE)
    store.publish(NAME)                                    # the store holds it: the hashes agree
    h, metrics = holder(store.view(NAME))
    h.swap_to(1)
    result = h.swap_to(2)
    assert result.outcome == "failed" and result.error.reason == "mismatch" and h.current.version == 1
    assert "model.pt: outputs disagree with model.safetensors rebuilt from the manifest" in result.error.detail
    assert failures(metrics, "mismatch") == 1
    assert verify_cli(store) == 1
    out = capsys.readouterr().out
    assert "v1: ok" in out and "v2: FAILED (mismatch)" in out and "outputs disagree" in out


def test_nan_weights_are_refused_by_the_server_and_by_registry_verify(store: RegistryStore,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    publish(store.root, 0)
    bad = publish(store.root, 1)
    path = bad.path / registry.STATE_DICT_FILE
    state = safetensors.torch.load_file(path)
    state["1.classifier.1.weight"][0, 0] = float("nan")
    safetensors.torch.save_file(state, path)
    rehash(bad, registry.STATE_DICT_FILE)
    store.publish(NAME)
    h, metrics = holder(store.view(NAME))
    h.swap_to(1)
    result = h.swap_to(2)
    assert result.outcome == "failed" and result.error.reason == "nonfinite" and h.current.version == 1
    assert "'1.classifier.1.weight' holds 1 non-finite value(s)" in result.error.detail
    assert failures(metrics, "nonfinite") == 1
    assert verify_cli(store, "2") == 1
    assert "v2: FAILED (nonfinite)" in capsys.readouterr().out


def test_a_truncated_model_pt_is_refused_by_registry_verify(store: RegistryStore,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    publish(store.root, 0, pt2=False)
    bad = publish(store.root, 1, pt2=False)
    path = bad.path / registry.TORCHSCRIPT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rehash(bad, registry.TORCHSCRIPT_FILE)
    store.publish(NAME)
    assert verify_cli(store) == 1
    out = capsys.readouterr().out
    assert "v2: FAILED (load): model 'cnn' version 2: model.pt: does not load" in out
    h, _ = holder(store.view(NAME))
    h.swap_to(1)
    assert h.swap_to(2).error.reason == "load" and h.current.version == 1


# -- model.pt2 ----------------------------------------------------------------------------------------
def test_model_pt2_is_published_and_served(store: RegistryStore) -> None:
    first = publish(store.root, 0)
    store.publish(NAME)
    assert first.manifest["export"] == {"pt2": True}
    entry = first.manifest["files"][registry.EXPORT_FILE]
    assert entry["sha256"] == hashlib.sha256(store.stored(NAME, 1, registry.EXPORT_FILE)).hexdigest()
    assert b'platform: "pytorch_libtorch"' in store.stored(NAME, None, registry.CONFIG_FILE)
    cache, sync = store.server_cache(NAME)
    h, _ = holder(cache)
    watcher = Watcher(h, sync=sync)
    result = watcher.check()
    assert result.kind == "full" and h.current.served_file == registry.EXPORT_FILE
    assert not isinstance(h.current.module, torch.jit.ScriptModule)
    assert torch.allclose(h.current.infer(X), expected(first, X), atol=1e-5)
    second = publish(store.root, 1)                       # same graph, new weights: copied into the standby
    store.publish(NAME)
    assert watcher.check().kind == "weights" and h.current.served_file == registry.EXPORT_FILE
    assert torch.allclose(h.current.infer(X), expected(second, X), atol=1e-5)
    assert verify_codes(cache) == {1: None, 2: None}


@pytest.mark.parametrize("fault", ["flipped byte", "foreign, rehashed"])
def test_a_tampered_model_pt2_is_refused(tmp_path: Path, store: RegistryStore, fault: str) -> None:
    publish(store.root, 0)
    bad = publish(store.root, 1)
    if fault == "foreign, rehashed":                       # a writer's forgery: the hashes agree
        shutil.copyfile(publish(tmp_path / "other", 7).path / registry.EXPORT_FILE, bad.path / registry.EXPORT_FILE)
        rehash(bad, registry.EXPORT_FILE)
    store.publish(NAME)
    if fault == "flipped byte":                            # damaged where it is stored
        store.tamper(NAME, 2, registry.EXPORT_FILE, lambda d: d[:len(d) // 2] + bytes([d[len(d) // 2] ^ 0xFF])
                     + d[len(d) // 2 + 1:])
        if store.engine == "s3":                           # refused by its hash before it enters a reader's copy
            with pytest.raises(registry.VerificationError, match=r"model\.pt2: sha256"):
                store.view(NAME)
            return
    h, metrics = holder(store.view(NAME))
    h.swap_to(1)
    result = h.swap_to(2)
    reason = "verification" if fault == "flipped byte" else "mismatch"
    assert result.outcome == "failed" and result.error.reason == reason and "model.pt2" in result.error.detail
    assert h.current.version == 1 and failures(metrics, reason) == 1
    assert verify_codes(h.registry_dir) == {1: None, 2: reason}


class _DataDependent(nn.Module):
    """A branch on the input's values: TorchScript traces one side, torch.export refuses to guess."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.flatten(x, 1))
        if bool(x.sum() >= 0):
            return out
        return -out


def test_a_model_that_does_not_export_publishes_without_model_pt2(reg: Path) -> None:
    with capture_logs() as logs:
        info = registry.write_version(reg, NAME, _DataDependent().eval(), input_shape=SHAPE, classes=CLASSES,
                                      parent=None)
    assert registry.EXPORT_FILE not in info.manifest["files"] and info.manifest["export"]["pt2"] is False
    assert info.manifest["export"]["error"]
    assert [e["model"] for e in logs if e["event"] == "pt2_export_failed"] == [NAME]
    h, _ = holder(reg)
    assert h.swap_to(1).outcome == "swapped" and h.current.served_file == registry.TORCHSCRIPT_FILE
    assert verify_codes(reg) == {1: None}


def test_probe_tolerance_is_relative_and_absolute() -> None:
    ref = torch.tensor([[10.0, -0.001]])
    assert trust.outputs_agree(ref + torch.tensor([[5e-4, 5e-5]]), ref)[0]
    assert not trust.outputs_agree(ref + torch.tensor([[0.0, 1e-3]]), ref)[0]
    assert not trust.outputs_agree(torch.full_like(ref, float("nan")), ref)[0]


def test_an_operator_factory_is_run_only_when_trusted(reg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server imports a factory the manifest names only if the operator listed it; otherwise model.pt's
    tensors must equal model.safetensors' and model.pt is the reference."""
    from daemon.registry import model_store
    from daemon.engine.session import UnlearningSession

    factory = ModelFactory("tests.byo_factories:tiny_net", {"num_classes": 10})
    torch.manual_seed(0)
    net = build_classifier(factory, mean=[0.5], std=[0.25]).eval()
    model_store.publish(reg, NAME, net, UnlearningSession(net, num_classes=10), input_shape=SHAPE, classes=CLASSES,
                        parent=None, factory=factory)
    monkeypatch.delenv(trust.TRUSTED_FACTORIES_ENV, raising=False)
    [result] = registry_ops.verify_all(reg, NAME)
    assert result.ok and "reference: model.pt" in result.detail
    monkeypatch.setenv(trust.TRUSTED_FACTORIES_ENV, "somewhere.else, tests.")
    [result] = registry_ops.verify_all(reg, NAME)
    assert result.ok and "reference: factory" in result.detail


def test_rollback_refuses_a_version_a_server_would_refuse(reg: Path) -> None:
    first = publish(reg, 0, pt2=False)
    publish(reg, 1, pt2=False)
    path = first.path / registry.STATE_DICT_FILE
    state = safetensors.torch.load_file(path)
    state["1.classifier.1.bias"][0] = float("inf")
    safetensors.torch.save_file(state, path)
    rehash(first, registry.STATE_DICT_FILE)
    with pytest.raises(registry.VerificationError, match="non-finite"):
        registry_ops.rollback(reg, NAME, 1)
    assert registry.list_versions(reg, NAME) == [1, 2]
