"""Issue 23, item 2: secrets at rest. Key files (made 0600 on first start, read back, refused when malformed),
the continual state sealed in the registry (round trip, wrong key, swapped or altered files, rollbacks, an
unsealed version from before read once), keyed instance-id and content digests (receipts carry ``id_hmac`` and
``id_key``, never a plain SHA-256 of the id), the ledger's schema 3 and its one id key, and exact rebase
exclusion with keyed and pre-schema-3 digests side by side."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat

import pytest
import torch

from daemon import keys, registry
from daemon.data.content import content_sha256, content_sha256_rows
from daemon.data.mnist import load_mnist
from daemon.data.sources import TensorSource
from daemon.pipeline.codec import Limits, check_request, decode_inputs
from daemon.pipeline.config import load_config
from daemon.pipeline.keyring import open_keys
from daemon.pipeline.ledger import ForgottenContent, Ledger
from daemon.pipeline.ledger_schema import IdKeyMismatch
from daemon.pipeline.model_spec import ModelSpec
from daemon.pipeline.rebase_set import ForeignKeyError, build_training_set
from daemon.pipeline.receipts import AppliedReceipt, ExactReceipt, instance_outcomes
from daemon.registry import model_store, ops as registry_ops
from tests.pipeline_harness import copy_registry, request

MODEL = "mnist-cnn"
SHAPE = (1, 28, 28)


def _key(tmp_path, name: str = "state.key", purpose: str = "state") -> keys.SecretKey:
    return keys.load_or_create_key(tmp_path / "keys" / name, purpose)[0]


# -- key files -------------------------------------------------------------------------------------------------
def test_a_missing_default_key_is_made_once_mode_0600_and_read_back_the_same(tmp_path):
    path = tmp_path / "keys" / "state.key"
    key, made = keys.load_or_create_key(path, "state")
    assert made and stat.S_IMODE(os.stat(path).st_mode) == 0o600 and not keys.loose_permissions(path)
    again, made_again = keys.load_or_create_key(path, "state")
    assert not made_again and again.material == key.material and again.key_id == key.key_id
    assert len(key.key_id) == 16 and key.key_id not in path.read_text() and "material" not in repr(key)
    assert [p.name for p in path.parent.iterdir()] == ["state.key"]          # no temporary left behind
    assert _key(tmp_path, "other.key").key_id != key.key_id


def test_a_malformed_or_missing_key_file_is_refused_naming_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not hex at all\n")
    with pytest.raises(keys.KeyFileError, match=r"bad\.key: a state key file holds 64 hex characters.*openssl rand"):
        keys.read_key(bad, "state")
    bad.write_text("ab" * 31)
    with pytest.raises(keys.KeyFileError, match="got 62 characters"):
        keys.read_key(bad, "state")
    with pytest.raises(keys.KeyFileError, match=r"no such id key file"):
        keys.read_key(tmp_path / "absent.key", "id")


def test_the_daemon_makes_both_default_keys_in_its_state_dir_and_never_a_configured_one(tmp_path):
    config = load_config(None, env={"UNLEARND_STATE_DIR": str(tmp_path / "state")})
    first = open_keys(config)
    assert first.state.key_id != first.ids.key_id
    for name in ("state.key", "id.key"):
        assert stat.S_IMODE(os.stat(tmp_path / "state" / "keys" / name).st_mode) == 0o600
    second = open_keys(config)
    assert (second.state.key_id, second.ids.key_id) == (first.state.key_id, first.ids.key_id)
    named = load_config(None, env={"UNLEARND_STATE_DIR": str(tmp_path / "state"),
                                   "UNLEARND_KEYS_STATE_KEY_FILE": str(tmp_path / "vault" / "state.key")})
    with pytest.raises(keys.KeyFileError, match="no such state key file"):
        open_keys(named)                    # a key the operator names is never made up: it would fork the key
    assert not (tmp_path / "vault").exists()


# -- sealing -------------------------------------------------------------------------------------------------------
def test_a_sealed_blob_opens_only_with_its_key_and_its_authenticated_data(tmp_path):
    key, other = _key(tmp_path), _key(tmp_path, "other.key")
    blob = keys.seal(key, b"subspace memory", b"m\0001\0session.safetensors")
    assert b"subspace memory" not in blob and keys.sealed_key_id(blob) == key.key_id
    assert keys.open_sealed(key, blob, b"m\0001\0session.safetensors", "x") == b"subspace memory"
    with pytest.raises(keys.SealError, match=f"sealed with state key {key.key_id}.*configured state key is "
                                             f"{other.key_id}"):
        keys.open_sealed(other, blob, b"m\0001\0session.safetensors", "x")
    with pytest.raises(keys.SealError, match="authentication failed"):
        keys.open_sealed(key, blob, b"m\0002\0session.safetensors", "x")       # another version
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(keys.SealError, match="authentication failed"):
        keys.open_sealed(key, bytes(flipped), b"m\0001\0session.safetensors", "x")
    with pytest.raises(keys.SealError, match="not a sealed file"):
        keys.open_sealed(key, b"{}", b"", "x")


@pytest.fixture()
def reg(tmp_path, mnist_registry):
    return copy_registry(mnist_registry, tmp_path / "registry")


def _publish(reg, live, key):
    return model_store.publish(reg, MODEL, live.model, live.session, input_shape=live.input_shape,
                               classes=live.classes, parent=registry.latest_version(reg, MODEL),
                               method={"name": "adv_imp"}, instances=1, state_key=key)


def _state_equal(a, b) -> bool:
    ta, ma = a.state()
    tb, mb = b.state()
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_an_unsealed_version_is_read_once_and_the_next_version_is_sealed_and_resumes_exactly(tmp_path, reg):
    key = _key(tmp_path)
    v1 = model_store.load_live(reg, MODEL, state_key=key)         # pretrained by today's tools: in clear
    assert model_store.STATE_SEAL not in v1.info.manifest
    v1.session.rounds_applied = 3                                   # something to tell the state by
    info = _publish(reg, v1, key)
    seal = info.manifest[model_store.STATE_SEAL]
    assert seal == {"alg": "AES-256-GCM", "key_id": key.key_id, "version": info.version,
                    "files": ["session.json", "session.safetensors"]}
    for name in seal["files"]:
        raw = (info.path / name).read_bytes()
        assert raw.startswith(b"UNLSEAL1") and b"rounds_applied" not in raw and b"subspace/" not in raw
    # what a server does: verify every file against the manifest's sha256, without any key
    assert registry.verify_version(reg, MODEL, info.version).sha256 == info.sha256
    resumed = model_store.load_live(reg, MODEL, state_key=key)
    assert resumed.session.rounds_applied == 3 and _state_equal(resumed.session, v1.session)
    with pytest.raises(model_store.StateKeyError, match=f"sealed with state key {key.key_id}; configure"):
        model_store.load_live(reg, MODEL)
    with pytest.raises(model_store.StateKeyError, match="configured state key is"):
        model_store.load_live(reg, MODEL, state_key=_key(tmp_path, "other.key"))


def test_a_sealed_file_moved_to_another_version_or_file_is_refused_even_with_a_fixed_manifest(tmp_path, reg):
    key = _key(tmp_path)
    live = model_store.load_live(reg, MODEL, state_key=key)
    v2, v3 = _publish(reg, live, key), _publish(reg, live, key)

    def plant(target, name, data: bytes) -> None:       # what a registry writer would do: file and manifest
        (target.path / name).write_bytes(data)
        manifest = json.loads((target.path / "manifest.json").read_text())
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (target.path / "manifest.json").write_text(json.dumps(manifest))

    plant(v3, "session.safetensors", (v2.path / "session.safetensors").read_bytes())
    with pytest.raises(model_store.StateKeyError, match="authentication failed.*moved from another file, version"):
        model_store.load_live(reg, MODEL, v3.version, state_key=key)
    plant(v2, "session.safetensors", (v2.path / "session.json").read_bytes())      # one file for the other
    with pytest.raises(model_store.StateKeyError, match="authentication failed"):
        model_store.load_live(reg, MODEL, v2.version, state_key=key)
    manifest = json.loads((v3.path / "manifest.json").read_text())
    manifest[model_store.STATE_SEAL]["version"] = v2.version           # claims v2's state, and is no rollback
    (v3.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(model_store.StateKeyError, match="sealed for version 2 and it is no rollback"):
        model_store.load_live(reg, MODEL, v3.version, state_key=key)


def test_a_rollback_to_a_sealed_version_resumes_its_state(tmp_path, reg):
    key = _key(tmp_path)
    live = model_store.load_live(reg, MODEL, state_key=key)
    live.session.rounds_applied = 7
    sealed = _publish(reg, live, key)
    live.session.rounds_applied = 8
    _publish(reg, live, key)
    rolled = registry_ops.rollback(reg, MODEL, sealed.version)          # a copy: files sealed for v2
    assert rolled.version == 4 and rolled.manifest[model_store.STATE_SEAL]["version"] == sealed.version
    assert model_store.load_live(reg, MODEL, state_key=key).session.rounds_applied == 7


# -- keyed digests -------------------------------------------------------------------------------------------------
def _spec() -> ModelSpec:
    m = load_mnist()
    return ModelSpec(name=MODEL, input_shape=SHAPE, num_classes=10,
                     sources={"mnist-train": TensorSource(m.train_x[:100], m.train_y[:100])})


def test_instance_ids_are_keyed_and_receipts_name_the_key_never_a_plain_hash_of_the_id(tmp_path):
    key = _key(tmp_path, "id.key", "id")
    body = request("q", refs=["mnist-train:3", "mnist-train:4"])
    clear = [i["id"] for i in body["instances"]]
    value = json.dumps(body).encode()
    checked = check_request(value, MODEL.encode(), {MODEL: _spec()}, Limits(), id_key=key)
    digests = [i.id_sha256 for i in checked.instances]
    assert all(d.startswith(f"hmac-sha256:{key.key_id}:") for d in digests)
    other = check_request(value, MODEL.encode(), {MODEL: _spec()}, Limits(), id_key=_key(tmp_path, "x.key", "id"))
    assert [i.id_sha256 for i in other.instances] != digests            # another key: nothing in common
    decoded = decode_inputs(checked)
    draft = AppliedReceipt(request_id="q", model=MODEL, kind="forget", round_id="r-000001", previous_version=1,
                           method={"name": "adv_imp"},
                           instances=instance_outcomes(digests, [5, 0], [5, 0], [3, 2], None),
                           forget_accuracy=0.0, probe_accuracy_before=0.9, probe_accuracy_after=0.9,
                           received_at=1.0, content_hashes=tuple(content_sha256_rows(
                               torch.stack([i.x for i in decoded.instances]), key)))
    receipt = draft.completed(version=2, sha256="ab" * 32, applied_at=2.0).to_dict()
    assert [set(i) for i in receipt["instances"]] == [{"id_hmac", "id_key", "label", "prediction_before",
                                                       "prediction_after"}] * 2
    assert {i["id_key"] for i in receipt["instances"]} == {key.key_id}
    text = json.dumps(receipt)
    for cid in clear:
        assert cid not in text and hashlib.sha256(cid.encode()).hexdigest() not in text
    assert AppliedReceipt.from_draft(draft.draft_dict()) == draft        # a draft in the ledger reads back whole
    exact = ExactReceipt("q", MODEL, "forget", "rb-000001", 2, {}, ((digests[0], "excluded"), ("ab" * 32, "excluded")))
    rows = exact.to_dict()["instances"]
    assert rows[0]["id_key"] == key.key_id and rows[1] == {"id_sha256": "ab" * 32, "rebase": "excluded"}
    assert ExactReceipt.from_draft(exact.to_dict()).instances == exact.instances


def test_a_schema_2_ledger_migrates_to_3_keeps_its_plain_digests_and_binds_one_id_key(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    with ledger.transaction() as tx:            # rows as schema 2 wrote them: plain SHA-256 digests
        tx.add_forgotten(MODEL, ["aa" * 32, "bb" * 32], "r-000001")
        tx.add_forgotten_content(MODEL, [ForgottenContent("cc" * 32, "aa" * 32, "q", "r-000001", "forget", 1)])
    ledger.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    db.commit()
    db.close()
    ledger = Ledger(path)
    key, other = _key(tmp_path, "id.key", "id"), _key(tmp_path, "x.key", "id")
    assert ledger.bind_id_key(key.key_id) == 3              # 2 id digests + 1 content digest stay plain
    assert ledger.bind_id_key(key.key_id) == 3
    with pytest.raises(IdKeyMismatch, match=f"made under id key {key.key_id}, the configured id key is "
                                            f"{other.key_id}"):
        ledger.bind_id_key(other.key_id)
    ledger.close()
    db = sqlite3.connect(path)
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    assert meta["schema_version"] == "3" and meta["migrated_from"] == "2" and meta["id_key"] == key.key_id


def test_an_exact_rebase_excludes_exactly_the_forgotten_items_by_keyed_and_by_pre_schema_3_digests(tmp_path):
    key = _key(tmp_path, "id.key", "id")
    m = load_mnist()
    source = TensorSource(m.train_x[:300], m.train_y[:300])

    def row(content: str, kind: str = "forget", **kw) -> ForgottenContent:
        return ForgottenContent(content, "i", "q", "r-000001", kind, kw.pop("label", 0), **kw)

    plain = [row(content_sha256(m.train_x[i])) for i in (3, 17)]                      # written under schema 2
    keyed = [row(content_sha256(m.train_x[i], key)) for i in (42, 250)]
    keyed.append(row(content_sha256(m.test_x[0], key)))                                # never a training item
    relabel = (int(m.train_y[5]) + 1) % 10
    keyed.append(row(content_sha256(m.train_x[5], key), "relabel", label=int(m.train_y[5]), target=relabel))
    forgotten = plain + keyed
    assert content_sha256(m.train_x[42], key) != content_sha256(m.train_x[42])
    ts = build_training_set(source, "mnist-train", range(300), SHAPE, forgotten, key=key)
    assert ts.indices == [i for i in range(300) if i not in (3, 17, 42, 250)] and ts.excluded == 4
    assert int(ts.labels[ts.indices.index(5)]) == relabel and ts.relabeled == 1
    assert [ts.status_of(r) for r in forgotten] == ["excluded"] * 4 + ["not_in_source", "relabeled"]
    with pytest.raises(ForeignKeyError, match=f"hashed under id key {key.key_id}, the configured id key is"):
        build_training_set(source, "mnist-train", range(300), SHAPE, forgotten, key=_key(tmp_path, "x.key", "id"))


def test_unlearnd_unlearn_on_a_sealed_version_asks_for_the_state_key(tmp_path, reg, capsys):
    from daemon.cli import main

    key = _key(tmp_path)
    _publish(reg, model_store.load_live(reg, MODEL), key)
    assert main(["unlearn", "--registry", str(reg), "--model", MODEL, "--forget-indices", "3"]) == 2
    assert f"sealed with state key {key.key_id}; configure that key" in capsys.readouterr().err


def test_the_daemon_refuses_to_start_on_a_ledger_of_another_id_key_or_a_named_key_file_that_is_missing(tmp_path):
    from daemon.pipeline.assembly import build_daemon
    from daemon.pipeline.runtime import RuntimeError_

    state = tmp_path / "state"
    ledger = Ledger(state / "ledger.sqlite")
    ledger.bind_id_key("0" * 16)                    # written under an id key this daemon does not have
    ledger.close()
    config = load_config(None, env={"UNLEARND_STATE_DIR": str(state), "UNLEARND_REGISTRY_DIR": str(tmp_path / "r")})
    with pytest.raises(RuntimeError_, match=r"made under id key 0{16}, the configured id key is [0-9a-f]{16}"):
        build_daemon(config)
    named = load_config(None, env={"UNLEARND_STATE_DIR": str(tmp_path / "s2"),
                                   "UNLEARND_KEYS_ID_KEY_FILE": str(tmp_path / "absent.key")})
    with pytest.raises(RuntimeError_, match="absent.key: no such id key file"):
        build_daemon(named)


def test_an_instance_forgotten_under_a_pre_schema_3_plain_digest_is_still_recognised_as_already_forgotten(tmp_path):
    from daemon.data.sources import builtin_sources
    from daemon.pipeline.batcher import Batcher
    from daemon.pipeline.intake import Intake
    from daemon.pipeline.metrics import DaemonMetrics
    from daemon.pipeline.offsets import OffsetBook
    from daemon.pipeline.receipts import ReceiptChain
    from tests.test_pipeline_hardening import _forgotten, _receipts, _record

    spec = ModelSpec(name=MODEL, input_shape=SHAPE, num_classes=10, sources=builtin_sources(load_mnist()))
    key = _key(tmp_path, "id.key", "id")
    ledger = Ledger(tmp_path / "l.sqlite")
    intake = Intake(ledger, specs={MODEL: spec}, predictors={MODEL: lambda x: [5] * len(x)}, limits=Limits(),
                    batcher=Batcher(64, 1.0), offsets=OffsetBook(), receipts=ReceiptChain("d1", "receipts"),
                    dlq_topic="dlq", metrics=DaemonMetrics(), versions=lambda _m: 7, id_key=key)
    first = request("f-1", refs=["mnist-train:0"])
    _forgotten(ledger, spec, first, label=3)            # recorded as schema 2 did: the plain SHA-256 of the id
    again = request("f-2", refs=["mnist-train:0"])
    again["instances"][0]["id"] = first["instances"][0]["id"]
    intake.process([_record(0, json.dumps(again).encode())])
    assert list(intake.batcher.waiting()) == []
    [receipt] = _receipts(ledger)
    assert receipt["reason"].startswith("already_forgotten") and receipt["instances"][0]["label"] == 3
    assert receipt["instances"][0]["id_key"] == key.key_id          # answered with the keyed digest
