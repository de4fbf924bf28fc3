"""A real S3 endpoint for tests: moto's standalone server on 127.0.0.1, spoken to over HTTP.

Import the fixtures where needed (conftest.py or a test module)::

    from tests.s3_server import s3_bucket, s3_server  # noqa: F401

`s3_server` (session) yields the endpoint URL, e.g. 'http://127.0.0.1:40123', with fake
credentials in the environment so boto3 and pyarrow find them through the standard AWS chain;
`s3_bucket` (function) yields the name of a fresh, empty bucket on it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Keep a developer's real ~/.aws profile and the EC2 metadata service (slow timeouts
    # off EC2) out of the chain, for boto3 and for pyarrow's C++ SDK alike.
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
UNSET_AWS_ENV = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SECURITY_TOKEN",
                 "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3-compatible server on a free local port; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    env = pytest.MonkeyPatch()  # the `monkeypatch` fixture is function-scoped
    for name, value in FAKE_AWS_ENV.items():
        env.setenv(name, value)
    for name in UNSET_AWS_ENV:
        env.delenv(name, raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        env.undo()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def seed_objects(bucket: str, keys: list[str], body: bytes = b"x") -> None:
    """Put many objects straight into the in-process server's store (milliseconds, not one
    HTTP PUT each: 1000 PUTs take ~10 s on 2 cores). Only for arranging tests; the code under
    test still lists and reads them over HTTP. Relies on ThreadedMotoServer sharing our process.
    """
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for key in keys:
        backend.put_object(bucket, key, body)
