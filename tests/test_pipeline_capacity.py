"""What is left of a model's capacity to forget (issue 21): deletions since the lineage's base, the retention
gate's headroom, the continual memory's free share; and the Prometheus text they come out as, checked by promtool.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest
from torch import nn

from daemon import registry
from daemon.pipeline.ledger import Ledger
from daemon.pipeline.metrics import DaemonMetrics, memory_free_share
from daemon.registry import lineage, model_store
from daemon.registry import ops as registry_ops
from tests.pipeline_harness import copy_registry, request
from tests.test_deploy_promql import require_binary
from tests.test_pipeline_commit import MODEL, _pending, _runtime

SHAPE = (1, 8, 8)
CLASSES = ["zero", "one", "two"]
TINY = "tiny"


def _write(root: Path, method: str | None, request_ids: tuple[str, ...] = (), **extra: object) -> int:
    """A version as a registry from before the count holds it (no ``deletions_since_base``), or with ``extra``."""
    torch.manual_seed(len(registry.list_versions(root, TINY)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    info = registry.write_version(root, TINY, model, input_shape=SHAPE, classes=CLASSES,
                                  parent=registry.latest_version(root, TINY), request_ids=list(request_ids),
                                  method={"name": method} if method else None, extra_manifest=extra)
    return info.version


# -- deletions since base, from the manifests --------------------------------------------------------
def test_a_pre_count_lineage_is_walked_back_to_its_newest_base_with_instances_from_the_caller(tmp_path):
    sizes = {"a": 3, "b": 2, "c": 5, "d": 7}
    _write(tmp_path, "import")                                          # v1: a base
    _write(tmp_path, "adv_imp", ("a",))                                 # v2
    _write(tmp_path, "adv_imp", ("b",))                                 # v3
    _write(tmp_path, "rebase")                                          # v4: a new base, v1..v3 no longer count
    _write(tmp_path, "adv_imp", ("c",))                                 # v5
    v6 = _write(tmp_path, "adv_imp", ("d",))
    count = lineage.deletions_since_base(tmp_path, TINY, v6, instances_of=lambda ids: sum(sizes[i] for i in ids))
    assert count == lineage.Lineage(12, exact=True)
    assert lineage.deletions_since_base(tmp_path, TINY, 3, instances_of=lambda ids: sum(sizes[i] for i in ids)) \
        == lineage.Lineage(5, exact=True)
    # without a way to tell instances, each request counts one and the count says it is a lower bound
    assert lineage.deletions_since_base(tmp_path, TINY, v6) == lineage.Lineage(2, exact=False)
    assert lineage.deletions_since_base(tmp_path, TINY, v6, instances_of=lambda ids: None) == \
        lineage.Lineage(2, exact=False)
    assert lineage.deletions_since_base(tmp_path, TINY, 4) == lineage.Lineage(0, exact=True)


def test_the_walk_stops_at_a_recorded_count_follows_a_rollback_and_admits_a_pruned_gap(tmp_path):
    _write(tmp_path, "pretrain")                                        # v1
    _write(tmp_path, "adv_imp", ("a",), deletions_since_base=40)        # v2 records its count: no further back
    v3 = _write(tmp_path, "adv_imp", ("b",))
    assert lineage.deletions_since_base(tmp_path, TINY, v3, instances_of=lambda ids: 4) == lineage.Lineage(44)
    rolled = registry_ops.rollback(tmp_path, TINY, 2)                   # v4 holds v2's weights: v2's count
    assert rolled.manifest["deletions_since_base"] == 40
    assert lineage.recorded_deletions(rolled.manifest) == 40
    # a rollback copied from a version without the field is followed to its target, not through its parent
    v5 = registry_ops.rollback(tmp_path, TINY, 1).version
    assert lineage.deletions_since_base(tmp_path, TINY, v5, instances_of=lambda ids: 4) == lineage.Lineage(0)
    v6 = _write(tmp_path, "adv_imp", ("c",))                            # parent v5
    registry_ops.prune(tmp_path, TINY, keep=2)                          # v1..v4 gone: the walk cannot reach a base
    assert lineage.deletions_since_base(tmp_path, TINY, v6, instances_of=lambda ids: 4) == \
        lineage.Lineage(4, exact=False)


def test_a_first_version_or_a_made_from_data_version_is_a_base_and_nothing_else_is():
    assert lineage.is_base({"parent": None, "method": None})
    for name in ("pretrain", "import", "rebase"):
        assert lineage.is_base({"parent": 7, "method": {"name": name}})
        assert lineage.recorded_deletions({"parent": 7, "method": {"name": name}, "deletions_since_base": 9}) == 0
    assert not lineage.is_base({"parent": 7, "method": {"name": "adv_imp"}})
    assert not lineage.is_base({"parent": 7, "method": {"name": "rollback"}, "rollback": {"to": 1}})
    assert lineage.recorded_deletions({"parent": 7, "method": {"name": "adv_imp"}}) is None
    assert lineage.recorded_deletions({"parent": 7, "method": {"name": "adv_imp"}, "deletions_since_base": True}) \
        is None


def test_publish_records_the_count_a_rebase_resets_it_and_a_restart_reads_it_back(tmp_path, mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    assert registry.read_manifest(reg, MODEL, 1)["deletions_since_base"] == 0     # pretrain: a base
    live = model_store.load_live(reg, MODEL)

    def publish(method: str, instances: int, **kwargs: object) -> dict:
        info = model_store.publish(reg, MODEL, live.model, live.session, input_shape=live.input_shape,
                                   classes=live.classes, parent=registry.latest_version(reg, MODEL),
                                   method={"name": method}, instances=instances, **kwargs)
        return info.manifest

    assert publish("adv_imp", 32)["deletions_since_base"] == 32          # v2, parent's count read from v1
    assert publish("adv_imp", 5, parent_deletions=100)["deletions_since_base"] == 105     # the caller's count
    assert publish("rebase", 0)["deletions_since_base"] == 0             # v4
    assert publish("adv_imp", 3)["deletions_since_base"] == 3            # v5
    with pytest.raises(ValueError, match="instances"):
        publish("adv_imp", -1)
    rt = _runtime(reg)                                                   # a restart: read from LATEST's manifest
    assert rt.version == 5 and rt.deletions_since_base == 3
    candidate = rt.run_round([_pending(rt, request("a", refs=["mnist-train:7", "mnist-train:8"]))],
                             should_abort=lambda: False)
    assert candidate.passed, candidate.reason
    info = rt.publish(candidate, "r-000001", {"name": "adv_imp"})
    assert rt.deletions_since_base == 5 == info.manifest["deletions_since_base"]
    registry_ops.rollback(reg, MODEL, 3)                                 # LATEST: v3's weights, v3's count
    rt.reload()
    assert rt.deletions_since_base == 105


def test_a_runtime_on_a_pre_count_version_asks_its_ledger_for_the_instances(tmp_path, mnist_registry, ledger_db):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    live = model_store.load_live(reg, MODEL)
    # a round version as an older unlearnd wrote it: no deletions_since_base in its manifest
    registry.write_version(reg, MODEL, live.model, input_shape=live.input_shape, classes=live.classes, parent=1,
                           request_ids=["old-1", "old-2"], method={"name": "adv_imp"},
                           extra_manifest={k: live.info.manifest[k] for k in ("arch", "factory", "factory_kwargs")},
                           extra_files={n: (live.info.path / n).read_bytes()
                                        for n in (model_store.SESSION_TENSORS, model_store.SESSION_META)})
    ledger = Ledger(ledger_db.target())
    with ledger.transaction() as tx:
        tx.accept("old-1", MODEL, "forget", 3, 1.0)
        tx.accept("old-2", MODEL, "forget", 4, 1.0)
    assert ledger.instances_of(["old-1", "old-2"]) == 7
    assert ledger.instances_of(["old-1", "unknown"]) is None
    from daemon.pipeline.config import ModelSection, RoundsSection
    from daemon.pipeline.runtime import ModelRuntime

    rt = ModelRuntime.open(ModelSection(name=MODEL, probe="mnist-test:0-199"), reg, RoundsSection(),
                           instances_of=ledger.instances_of)
    rt.ensure_model()
    assert rt.version == 2 and rt.deletions_since_base == 7
    ledger.close()


# -- the retention gate's headroom -------------------------------------------------------------------
def test_headroom_is_the_probe_accuracy_above_the_gates_floor_and_goes_negative_below_it(tmp_path, mnist_registry):
    reg = copy_registry(mnist_registry, tmp_path / "registry")
    rt = _runtime(reg, retention_max_drop=0.02)
    original = rt.probe_accuracy("original")
    assert rt.gate_floor() == pytest.approx(original - 0.02)
    assert rt.retention_headroom() == pytest.approx(0.02)                # the original model: the whole gate
    candidate = rt.run_round([_pending(rt, request("a", refs=["mnist-train:7"]))], should_abort=lambda: False)
    assert candidate.passed, candidate.reason
    rt.publish(candidate, "r-000001", {"name": "adv_imp"})
    after = candidate.metrics.probe_accuracy_after
    assert rt.retention_headroom() == pytest.approx(after - (original - 0.02))
    assert rt.retention_headroom() >= 0                                  # the gate let the round through
    strict = _runtime(reg, retention_max_drop=-0.01)                     # a floor above the original: refused
    assert strict.retention_headroom() < 0
    refused = strict.run_round([_pending(strict, request("b", refs=["mnist-train:9"]))], should_abort=lambda: False)
    assert not refused.passed and refused.reason.startswith("retention gate")


# -- the memory's free share, and the exported text ----------------------------------------------------
def test_the_free_share_is_the_roomiest_layers_and_one_when_nothing_is_protected():
    assert memory_free_share({}) == 1.0
    assert memory_free_share({"conv1": 1.0, "fc1": 0.25, "fc2": 0.8}) == pytest.approx(0.75)
    assert memory_free_share({"conv1": 1.0, "fc1": 1.0}) == 0.0


def test_the_gauges_render_as_valid_prometheus_text_and_an_emptied_memory_reads_zero():
    m = DaemonMetrics()
    m.export_memory_fill("mnist-cnn", {"conv1": 1.0, "fc1": 0.4})
    m.export_capacity("mnist-cnn", headroom=0.0125, floor=0.965, deletions=320)
    get = m.registry.get_sample_value
    assert get("unlearnd_memory_free_ratio", {"model": "mnist-cnn"}) == pytest.approx(0.6)
    assert get("unlearnd_retention_headroom_ratio", {"model": "mnist-cnn"}) == 0.0125
    assert get("unlearnd_retention_gate_floor_ratio", {"model": "mnist-cnn"}) == 0.965
    assert get("unlearnd_deletions_since_base", {"model": "mnist-cnn"}) == 320
    m.export_memory_fill("mnist-cnn", {})                               # a rebase: a fresh, empty memory
    assert get("unlearnd_memory_fill_ratio", {"model": "mnist-cnn", "layer": "fc1"}) == 0.0
    assert get("unlearnd_memory_free_ratio", {"model": "mnist-cnn"}) == 1.0
    text = generate_latest(m.registry)
    result = subprocess.run([require_binary("promtool"), "check", "metrics"], input=text, capture_output=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("unlearnd_retention_headroom_ratio", "unlearnd_retention_gate_floor_ratio",
                 "unlearnd_deletions_since_base", "unlearnd_memory_free_ratio"):
        assert f'{name}{{model="mnist-cnn"}}'.encode() in text
    assert not math.isnan(get("unlearnd_memory_free_ratio", {"model": "mnist-cnn"}))
