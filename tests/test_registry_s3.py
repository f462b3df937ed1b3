"""The registry on S3 (moto's real HTTP server): push order, interrupted pushes, pull with verification, URLs."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from daemon.registry import write_version
from daemon.registry.layout import RegistryError, VerificationError
from daemon.registry.read import latest_version, verify_version
from daemon.registry.remote import (
    RemoteConfigError,
    S3Location,
    check_reachable,
    make_client,
    parse_registry_url,
    pull_version,
    push_version,
    remote_latest,
)
from tests.s3_harness import S3Endpoint, moto_endpoint, s3  # noqa: F401 - fixtures

SHAPE = (1, 8, 8)
CLASSES = ["zero", "one", "two"]
NAME = "tiny-cnn"


def tiny_model(scale: float = 1.0) -> nn.Module:
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    for p in m.parameters():
        p.data.fill_(0.01 * scale)
    return m


def write(root: Path, scale: float = 1.0, parent: int | None = None) -> int:
    info = write_version(root, NAME, tiny_model(scale), input_shape=SHAPE, classes=CLASSES, parent=parent,
                        export_pt2=False)
    return info.version


def keys(s3: S3Endpoint) -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=s3.bucket)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_push_then_pull_round_trip(tmp_path: Path, s3: S3Endpoint) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    v = write(src)
    loc = S3Location(s3.bucket, "reg/")
    client = s3.client()
    push_version(client, loc, src, NAME, v)
    assert remote_latest(client, loc, NAME) == v
    assert f"reg/{NAME}/{v}/manifest.json" in keys(s3)
    assert f"reg/{NAME}/config.pbtxt" in keys(s3)    # Triton layout: config beside the version dirs
    pull_version(client, loc, dst, NAME, v)
    assert verify_version(dst, NAME, v).sha256 == verify_version(src, NAME, v).sha256
    assert (dst / NAME / "config.pbtxt").read_bytes() == (src / NAME / "config.pbtxt").read_bytes()


@pytest.mark.parametrize("stop_at", ["files", "manifest", "latest"])
def test_interrupted_push_leaves_no_visible_version_and_repush_completes(
        tmp_path: Path, s3: S3Endpoint, stop_at: str) -> None:
    src = tmp_path / "a"
    v1 = write(src)
    loc = S3Location(s3.bucket, "")
    client = s3.client()
    push_version(client, loc, src, NAME, v1)
    v2 = write(src, scale=2.0, parent=v1)

    def hook(step: str) -> None:
        if step == stop_at:
            raise KeyboardInterrupt(step)

    with pytest.raises(KeyboardInterrupt):
        push_version(client, loc, src, NAME, v2, hook=hook)
    assert remote_latest(client, loc, NAME) == v1             # readers still see only the complete v1
    manifest_there = f"{NAME}/{v2}/manifest.json" in keys(s3)
    assert manifest_there == (stop_at == "latest")            # a manifest only after every file
    push_version(client, loc, src, NAME, v2)                  # recovery re-pushes: idempotent
    assert remote_latest(client, loc, NAME) == v2
    pull_version(client, loc, tmp_path / "b", NAME, v2)


def test_second_writer_cannot_create_the_same_version(tmp_path: Path, s3: S3Endpoint) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    va, vb = write(a, 1.0), write(b, 3.0)
    assert va == vb == 1
    loc = S3Location(s3.bucket, "")
    client = s3.client()
    push_version(client, loc, a, NAME, va)
    with pytest.raises(RegistryError, match="another writer"):
        push_version(client, loc, b, NAME, vb)
    assert verify_version(a, NAME, 1).sha256 == verify_version(
        pull_version(client, loc, tmp_path / "c", NAME, 1).parent.parent, NAME, 1).sha256


def test_pull_refuses_a_tampered_object(tmp_path: Path, s3: S3Endpoint) -> None:
    src = tmp_path / "a"
    v = write(src)
    loc = S3Location(s3.bucket, "")
    client = s3.client()
    push_version(client, loc, src, NAME, v)
    client.put_object(Bucket=s3.bucket, Key=f"{NAME}/{v}/model.safetensors", Body=b"not the weights")
    with pytest.raises(VerificationError, match="sha256"):
        pull_version(client, loc, tmp_path / "b", NAME, v)
    assert latest_version(tmp_path / "b", NAME) is None
    assert not (tmp_path / "b" / NAME / str(v)).exists()      # nothing half-written became visible


@pytest.mark.parametrize("url", ["http://x/y", "s3://", "s3://UPPER/x", "s3://ok-bucket/a/../b", ""])
def test_bad_urls_name_the_setting(url: str) -> None:
    with pytest.raises(RemoteConfigError, match="registry.url"):
        parse_registry_url(url)


def test_good_urls() -> None:
    assert parse_registry_url("s3://my-bucket/models/prod") == S3Location("my-bucket", "models/prod/")
    assert parse_registry_url("s3://my-bucket") == S3Location("my-bucket", "")
    assert parse_registry_url("file:///srv/reg") == Path("/srv/reg")
    assert parse_registry_url("/srv/reg") == Path("/srv/reg")


def test_missing_bucket_and_unreachable_endpoint_name_the_setting(s3: S3Endpoint) -> None:
    with pytest.raises(RemoteConfigError, match=r"registry\.url: bucket 'no-such-bucket' does not exist"):
        check_reachable(s3.client(), S3Location("no-such-bucket", ""))
    from tests.s3_harness import _free_port
    dead = make_client(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(RemoteConfigError, match=r"registry\.endpoint_url"):
        check_reachable(dead, S3Location("any-bucket", ""))


def test_the_buckets_config_pins_the_version_latest_names_and_the_local_copy_does_not(tmp_path: Path,
                                                                                        s3: S3Endpoint) -> None:
    """A Triton server on the bucket must load LATEST's version, not a higher directory still being uploaded."""
    src = tmp_path / "a"
    loc, client = S3Location(s3.bucket, "reg/"), s3.client()
    v1 = write(src)
    push_version(client, loc, src, NAME, v1)
    v2 = write(src, 2.0, parent=v1)
    push_version(client, loc, src, NAME, v2, set_latest=False)         # uploaded, not LATEST yet
    config = client.get_object(Bucket=s3.bucket, Key=f"reg/{NAME}/config.pbtxt")["Body"].read().decode()
    assert config.count("version_policy") == 1 and f"versions: [ {v1} ]" in config
    push_version(client, loc, src, NAME, v2)
    config = client.get_object(Bucket=s3.bucket, Key=f"reg/{NAME}/config.pbtxt")["Body"].read().decode()
    assert config.count("version_policy") == 1 and f"versions: [ {v2} ]" in config
    local = (src / NAME / "config.pbtxt").read_text()
    assert "version_policy" not in local and config.startswith(local.rstrip("\n"))
