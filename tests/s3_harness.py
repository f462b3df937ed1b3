"""A real S3 endpoint for tests: moto's standalone server on 127.0.0.1 and a free port, torn down after.

moto keeps everything in memory, so a test's bucket lives as long as the server; each fixture use gets a
fresh bucket name. ``outage_s3`` is a server of its own that a test can stop and start again on the same port
(an object store that goes away and comes back): moto's buckets live in this process, not in the server, so
they are all there again after the restart."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class S3Endpoint:
    """An S3 endpoint with one fresh bucket."""

    endpoint_url: str
    bucket: str

    def client(self):  # noqa: ANN201 - a boto3 client
        from daemon.registry.remote import make_client
        return make_client(self.endpoint_url)


def _credentials() -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Start moto's ThreadedMotoServer once per session; test credentials in the environment."""
    moto_server = pytest.importorskip("moto.server")
    _credentials()
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3(moto_endpoint: str) -> S3Endpoint:
    """A fresh bucket on the session's moto server."""
    ep = S3Endpoint(moto_endpoint, f"t-{uuid.uuid4().hex[:12]}")
    ep.client().create_bucket(Bucket=ep.bucket)
    return ep


class RestartableS3(S3Endpoint):
    """A bucket on a moto server of its own: :meth:`stop` takes the endpoint away (connections refused, as for a
    store that is down), :meth:`start` brings it back on the same port with every object it held."""

    def __init__(self) -> None:
        moto_server = pytest.importorskip("moto.server")
        _credentials()
        port = _free_port()
        super().__init__(f"http://127.0.0.1:{port}", f"t-{uuid.uuid4().hex[:12]}")
        self._make = lambda: moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server = None

    def start(self) -> RestartableS3:
        if self._server is None:
            self._server = self._make()
            self._server.start()
        return self

    def stop(self) -> None:
        """Shut the server down and close its listening socket: new connections are refused at once."""
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()

    @property
    def running(self) -> bool:
        return self._server is not None


@pytest.fixture()
def outage_s3() -> Iterator[RestartableS3]:
    """A fresh bucket on a moto server that the test may stop and start again; stopped after the test."""
    ep = RestartableS3().start()
    ep.client().create_bucket(Bucket=ep.bucket)
    try:
        yield ep
    finally:
        ep.stop()


def read_bucket(endpoint: S3Endpoint, prefix: str, model: str, scratch) -> tuple[int, list[int]]:  # noqa: ANN001
    """What a reader of the bucket sees, pulled into a fresh ``scratch`` folder: ``LATEST``'s version (every file's
    sha256 checked) and every complete (manifest) version, all verified. Asserts there is a LATEST and nothing
    failed; returns (LATEST, the versions pulled)."""
    import shutil

    from daemon.registry.mirror import RegistryMirror
    from daemon.registry.remote import S3Location

    shutil.rmtree(scratch, ignore_errors=True)
    mirror = RegistryMirror(endpoint.client(), S3Location(endpoint.bucket, prefix), scratch)
    latest = mirror.latest(model)
    assert latest is not None
    assert mirror.pull_latest(model) == latest            # raises on a missing file or a wrong sha256
    pulled, failed = mirror.pull_all(model)
    assert not failed, failed
    assert latest in pulled
    return latest, pulled
