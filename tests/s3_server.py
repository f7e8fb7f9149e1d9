"""A real S3 endpoint for tests: moto's threaded server on a free local port, reached over HTTP.

    from s3_server import moto_s3, s3_store_factory   # fixtures, in a test module

start_moto() can also be used directly (scripts, other fixtures).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

# Dummy credentials: they make boto3 sign requests and guarantee no real account is ever touched.
DUMMY_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
CLEARED_ENVIRONMENT = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_moto():
    """Start moto's S3 server on a free port -> (server, "http://127.0.0.1:PORT"); call server.stop()."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """Session-wide moto S3 endpoint URL, with dummy AWS_* credentials set for the session."""
    saved = {name: os.environ.get(name) for name in (*DUMMY_ENVIRONMENT, *CLEARED_ENVIRONMENT)}
    os.environ.update(DUMMY_ENVIRONMENT)
    for name in CLEARED_ENVIRONMENT:
        os.environ.pop(name, None)
    server, url = start_moto()
    try:
        yield url
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_store_factory(moto_s3):
    """make(**options) -> a fresh S3Store on its own new bucket of the moto endpoint."""
    from tlq_farm.store.s3 import S3Store

    def make(prefix: str = "tlq", **options) -> S3Store:
        store = S3Store(f"test-{uuid.uuid4().hex[:16]}", prefix, endpoint_url=moto_s3, **options)
        store.ensure_bucket()
        return store

    return make
