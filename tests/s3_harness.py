"""A real S3 endpoint for tests: moto's standalone server on 127.0.0.1 and a free port, torn down after.

moto keeps everything in memory, so a test's bucket lives as long as the server; each fixture use gets a
fresh bucket name."""

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Start moto's ThreadedMotoServer once per session; test credentials in the environment."""
    moto_server = pytest.importorskip("moto.server")
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
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
