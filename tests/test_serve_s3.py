"""Two `unlearnd serve` processes reading one bucket (moto's real server), each with its own cache, as two hosts
would: both serve each new version; a version not yet named by LATEST, or one whose bytes in the bucket do not match
its manifest, is never served; `unlearnd registry list/verify/rollback` read the same URL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import registry
from daemon.cli import main
from daemon.registry.remote import S3Location, push_version
from tests.s3_harness import S3Endpoint, moto_endpoint, s3  # noqa: F401 - fixtures
from tests.test_serve import NAME, Server, publish, served_version, wait_for_version

PREFIX = "reg/"


class Publisher:
    """A daemon's side, reduced: write a version to a local working copy, then push it to the bucket."""

    def __init__(self, root: Path, s3: S3Endpoint) -> None:
        self.root, self.client, self.loc = root, s3.client(), S3Location(s3.bucket, PREFIX)

    def next(self, *, set_latest: bool = True) -> int:
        info = publish(self.root)
        push_version(self.client, self.loc, self.root, NAME, info.version, set_latest=set_latest)
        return info.version


@pytest.fixture()
def bucket(tmp_path: Path, s3: S3Endpoint) -> tuple[Publisher, str]:
    pub = Publisher(tmp_path / "writer", s3)
    pub.next()
    return pub, f"s3://{s3.bucket}/{PREFIX}"


@pytest.fixture()
def replicas(tmp_path: Path, s3: S3Endpoint, bucket: tuple[Publisher, str]) -> Iterator[list[Server]]:
    _pub, url = bucket
    servers: list[Server] = []
    try:
        for name in ("a", "b"):
            servers.append(Server(url, NAME, "--s3-endpoint-url", s3.endpoint_url,   # type: ignore[arg-type]
                                  "--cache-dir", str(tmp_path / f"cache-{name}")))
        yield servers
    finally:
        for srv in servers:
            rc, out = srv.stop()
            assert rc == 0, out


@pytest.mark.slow
def test_two_replicas_serve_each_new_version_and_never_a_half_or_damaged_one(tmp_path, s3, bucket, replicas):
    pub, _url = bucket
    assert [served_version(r) for r in replicas] == [1, 1]
    for _ in range(2):
        v = pub.next()
        for r in replicas:
            wait_for_version(r, v, timeout=10)
    # files and manifest in the bucket, LATEST not moved: nobody serves it
    hidden = pub.next(set_latest=False)
    # a version whose weights in the bucket are not those its manifest hashes: refused, the last one keeps serving
    bad = publish(pub.root)
    key = f"{PREFIX}{NAME}/{bad.version}/model.pt"
    push_version(pub.client, pub.loc, pub.root, NAME, bad.version, set_latest=False)
    pub.client.put_object(Bucket=s3.bucket, Key=key, Body=b"not the weights")
    pub.client.put_object(Bucket=s3.bucket, Key=f"{PREFIX}{NAME}/LATEST", Body=f"{bad.version}\n".encode())
    time.sleep(1.5)                     # several polls of both replicas
    assert [served_version(r) for r in replicas] == [v, v], "a damaged or unnamed version was served"
    for name in ("a", "b"):
        assert hidden not in registry.list_versions(tmp_path / f"cache-{name}", NAME)
        assert bad.version not in registry.list_versions(tmp_path / f"cache-{name}", NAME)
    good = pub.next()
    for r in replicas:
        wait_for_version(r, good, timeout=10)


def test_registry_commands_read_the_bucket(tmp_path, s3, bucket, capsys):
    pub, url = bucket
    pub.next()
    common = ["--registry", url, "--s3-endpoint-url", s3.endpoint_url, "--model", NAME]
    assert main(["registry", "list", *common, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["latest"]) for r in rows] == [(1, False), (2, True)]
    assert main(["registry", "verify", *common]) == 0
    assert "2 versions verified" in capsys.readouterr().out
    assert main(["registry", "rollback", *common, "--to", "1", "--reason", "test"]) == 0
    assert f"LATEST -> 3 in {url}" in capsys.readouterr().out
    reader = tmp_path / "reader"
    from daemon.registry.mirror import RegistryMirror
    mirror = RegistryMirror(s3.client(), S3Location(s3.bucket, PREFIX), reader)
    assert mirror.latest(NAME) == 3 and mirror.pull_latest(NAME) == 3
    assert registry.read_manifest(reader, NAME, 3)["rollback"]["to"] == 1
    pub.client.put_object(Bucket=s3.bucket, Key=f"{PREFIX}{NAME}/2/model.pt", Body=b"damaged")
    assert main(["registry", "verify", *common]) == 1
    out = capsys.readouterr().out
    assert f"{NAME} v2: FAILED (bucket)" in out and f"{NAME} v3: ok" in out
    assert main(["registry", "prune", *common]) == 2
    assert "lifecycle" in capsys.readouterr().err
