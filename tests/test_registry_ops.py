"""The registry for operators: leases, retention, rollback, verification, and the `unlearnd registry` CLI.

The CLI's tests run on both engines (the ``store`` fixture, tests/registry_stores.py): on S3 the command pulls
the bucket's versions into a scratch copy, verifies them, and pushes a rollback back. Leases and prune are the
folder's (on a bucket versions are kept by its lifecycle rules; prune is refused there, tested below)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from daemon import registry
from daemon.registry import ops as registry_ops
from daemon.cli import main
from tests.registry_stores import RegistryStore

SHAPE = (1, 8, 8)
CLASSES = ["zero", "one", "two"]
NAME = "tiny"


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def publish(root: Path, seed: int, request_ids: tuple[str, ...] = (), **kwargs: object) -> registry.VersionInfo:
    parent = registry.latest_version(root, NAME)
    return registry.write_version(root, NAME, tiny_model(seed), input_shape=SHAPE, classes=CLASSES, parent=parent,
                                  request_ids=list(request_ids), **kwargs)


def write_five(root: Path) -> Path:
    """Versions 1..5, each forgetting one request, with session files beside the weights."""
    for i in range(1, 6):
        publish(root, i, (f"req-{i}",) if i > 1 else (),
                extra_files={"session.json": json.dumps({"round": i}).encode()},
                extra_manifest={"arch": "tiny"})
    return root


@pytest.fixture()
def five(tmp_path: Path) -> Path:
    return write_five(tmp_path)


@pytest.fixture()
def stored_five(store: RegistryStore) -> RegistryStore:
    """The five versions, published in the store (pushed to the bucket on S3)."""
    write_five(store.root)
    store.publish(NAME)
    return store


# -- leases -------------------------------------------------------------------------------------------
def test_lease_written_read_refreshed_and_released(tmp_path: Path) -> None:
    registry_ops.write_lease(tmp_path, NAME, "srv-a", version=3, ttl_s=10, now=1000.0)
    registry_ops.write_lease(tmp_path, NAME, "srv-b", version=4, loading=5, ttl_s=10, now=1000.0)
    assert (leases_dir := tmp_path / NAME / registry_ops.LEASE_DIR).is_dir()
    assert sorted(lease.server_id for lease in registry_ops.read_leases(tmp_path, NAME)) == ["srv-a", "srv-b"]
    assert [lease.versions for lease in registry_ops.live_leases(tmp_path, NAME, now=1005.0)] == [{3}, {4, 5}]
    assert registry_ops.live_leases(tmp_path, NAME, now=1011.0) == []       # both expired
    registry_ops.write_lease(tmp_path, NAME, "srv-a", version=4, ttl_s=10, now=1010.0)   # refresh
    assert [lease.server_id for lease in registry_ops.live_leases(tmp_path, NAME, now=1011.0)] == ["srv-a"]
    registry_ops.release_lease(tmp_path, NAME, "srv-a")
    registry_ops.release_lease(tmp_path, NAME, "srv-a")                     # idempotent
    assert [p.name for p in leases_dir.glob("*.json")] == ["srv-b.json"]


def test_unreadable_lease_protects_nothing_and_bad_ids_are_refused(tmp_path: Path) -> None:
    (tmp_path / NAME / registry_ops.LEASE_DIR).mkdir(parents=True)
    (tmp_path / NAME / registry_ops.LEASE_DIR / "junk.json").write_text("{half")
    assert registry_ops.read_leases(tmp_path, NAME) == []
    with pytest.raises(ValueError, match="server id"):
        registry_ops.write_lease(tmp_path, NAME, "../escape", version=1)
    with pytest.raises(ValueError, match="ttl"):
        registry_ops.write_lease(tmp_path, NAME, "ok", version=1, ttl_s=0)
    assert registry_ops.default_server_id(8000).endswith("-8000")


# -- retention ----------------------------------------------------------------------------------------
def test_prune_keeps_newest_n(five: Path) -> None:
    result = registry_ops.prune(five, NAME, keep=2)
    assert result.deleted == [1, 2, 3] and result.kept == [4, 5] and result.protected == {}
    assert registry.list_versions(five, NAME) == [4, 5]
    assert not any(p.name.startswith(".tmp") for p in (five / NAME).iterdir())
    assert publish(five, 9).version == 6               # numbers still only grow


def test_prune_never_deletes_latest_nor_a_served_version(five: Path) -> None:
    registry.set_latest(five, NAME, 2)                  # an operator pointed LATEST back
    registry_ops.write_lease(five, NAME, "srv-a", version=1, loading=3, ttl_s=60)
    dry = registry_ops.prune(five, NAME, keep=1, dry_run=True)
    assert dry.deleted == [4] and registry.list_versions(five, NAME) == [1, 2, 3, 4, 5]
    result = registry_ops.prune(five, NAME, keep=1)
    assert result.deleted == [4]
    assert registry.list_versions(five, NAME) == [1, 2, 3, 5]
    assert result.protected == {1: ["served by srv-a"], 2: ["LATEST"], 3: ["served by srv-a"]}


def test_expired_lease_no_longer_protects(five: Path) -> None:
    registry_ops.write_lease(five, NAME, "dead", version=1, ttl_s=5, now=1000.0)
    result = registry_ops.prune(five, NAME, keep=1)     # now is far past 1005
    assert 1 in result.deleted
    assert not (five / NAME / registry_ops.LEASE_DIR / "dead.json").exists()   # long-dead lease collected


def test_prune_rejects_bad_keep(five: Path) -> None:
    for keep in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="keep must be an integer >= 1"):
            registry_ops.prune(five, NAME, keep=keep)  # type: ignore[arg-type]


# -- rollback -----------------------------------------------------------------------------------------
def test_rollback_is_a_new_version_with_the_old_files(five: Path) -> None:
    old = registry.verify_version(five, NAME, 2)
    info = registry_ops.rollback(five, NAME, 2, reason="bad round")
    assert info.version == 6 and registry.latest_version(five, NAME) == 6
    m = info.manifest
    assert m["parent"] == 5 and m["sha256"] == old.sha256 and m["files"] == old.manifest["files"]
    assert m["rollback"] == {"to": 2, "from": 5, "reason": "bad round",
                             "reverted_request_ids": ["req-3", "req-4", "req-5"], "lineage_complete": True}
    assert m["method"] == {"name": "rollback", "params": {"to": 2, "from": 5}}
    assert m["request_ids"] == [] and m["round_id"] is None and m["arch"] == "tiny"
    # the session state travels with the weights, so a restart continues from version 2
    assert json.loads(registry.read_extra_file(info, "session.json")) == {"round": 2}
    state_old, _ = registry.load_state_dict(five, NAME, 2)
    state_new, _ = registry.load_state_dict(five, NAME)
    assert all(torch.equal(state_old[k], state_new[k]) for k in state_old)
    assert registry.list_versions(five, NAME) == [1, 2, 3, 4, 5, 6]     # history only grows


def test_rollback_lineage_after_a_rollback(five: Path) -> None:
    registry_ops.rollback(five, NAME, 2)                                 # v6 = v2
    publish(five, 7, ("req-7",))                                         # v7 on top of v6
    info = registry_ops.rollback(five, NAME, 4)                          # v8 = v4
    assert registry_ops.forgotten_request_ids(five, NAME, 7) == ({"req-2", "req-7"}, True)
    assert info.manifest["rollback"]["reverted_request_ids"] == ["req-7"]
    registry_ops.prune(five, NAME, keep=1)
    assert registry_ops.forgotten_request_ids(five, NAME, 8)[1] is False  # v4 was pruned: incomplete


def test_rollback_refuses_a_corrupted_or_unknown_version(five: Path) -> None:
    path = five / NAME / "2" / registry.STATE_DICT_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(registry.VerificationError, match="sha256 mismatch"):
        registry_ops.rollback(five, NAME, 2)
    with pytest.raises(ValueError, match="has no version 42"):
        registry_ops.rollback(five, NAME, 42)
    with pytest.raises(ValueError, match="already names version 5"):
        registry_ops.rollback(five, NAME, 5)
    assert registry.list_versions(five, NAME) == [1, 2, 3, 4, 5] and registry.latest_version(five, NAME) == 5


def test_copy_version_refuses_to_rewrite_identity_keys(five: Path) -> None:
    with pytest.raises(ValueError, match="may not set sha256"):
        registry.copy_version(five, NAME, 1, parent=5, manifest_updates={"sha256": "0" * 64})


def test_verify_all_names_the_damaged_version(five: Path) -> None:
    (five / NAME / "3" / registry.TORCHSCRIPT_FILE).write_bytes(b"not torchscript")
    results = registry_ops.verify_all(five, NAME)
    assert [r.ok for r in results] == [True, True, False, True, True]
    assert "model.pt" in results[2].detail


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_list_show_verify_rollback_prune(stored_five: RegistryStore, capsys: pytest.CaptureFixture[str]) -> None:
    store = stored_five
    base = [*store.cli_args(), "--model", NAME]
    assert main(["registry", "list", *base, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["latest"]
    assert main(["registry", "show", *base, "3"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 3
    assert main(["registry", "verify", *base]) == 0
    assert "5 versions verified" in capsys.readouterr().out
    assert main(["registry", "rollback", *base, "--to", "1", "--reason", "test"]) == 0
    captured = capsys.readouterr()
    assert "version 6 holds version 1's files (parent 5)" in captured.out
    assert "undoes the unlearning of 4 request(s)" in captured.err
    assert store.stored(NAME, None, registry.LATEST_FILE) == b"6\n"       # what every reader now loads
    assert registry.verify_version(store.view(NAME), NAME, 6).manifest["rollback"]["to"] == 1
    assert main(["registry", "list", *base]) == 0
    assert "rollback to 1" in capsys.readouterr().out
    if store.engine == "s3":
        assert main(["registry", "prune", *base, "--keep", "2"]) == 2
        assert "lifecycle rules" in capsys.readouterr().err
        return
    assert main(["registry", "prune", *base, "--keep", "2"]) == 0
    assert "deleted 4 version(s): 1, 2, 3, 4" in capsys.readouterr().out


def test_cli_verify_fails_with_exit_1_and_bad_usage_exits_2(stored_five: RegistryStore,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = stored_five
    base = [*store.cli_args(), "--model", NAME]
    store.tamper(NAME, 4, registry.STATE_DICT_FILE, lambda _data: b"x")
    assert main(["registry", "verify", *base]) == 1
    assert "v4: FAILED" in capsys.readouterr().out
    assert main(["registry", "rollback", *base, "--to", "4"]) == 1          # damaged: nothing written
    assert "version 4 is damaged" in capsys.readouterr().err
    assert registry.list_versions(store.root, NAME) == [1, 2, 3, 4, 5]
    assert store.stored(NAME, None, registry.LATEST_FILE) == b"5\n"
    assert main(["registry", "rollback", *base, "--to", "9"]) == 2
    assert "has no version 9" in capsys.readouterr().err
    assert main(["registry", "show", *base, "9"]) == 2
    nowhere = [str(store.root / "nope")] if store.engine == "files" else [f"s3://missing-{store.loc.bucket}/x",
                                                                          *store.cli_args()[2:]]
    assert main(["registry", "list", "--registry", *nowhere, "--model", NAME]) == 2
    assert main(["registry", "list", *store.cli_args(), "--model", "other"]) == 2
    assert "not in" in capsys.readouterr().err
    assert main(["registry", "prune", *base, "--keep", "0"]) == 2
