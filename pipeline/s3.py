"""S3 URIs and the two S3 clients the storage layer uses, both built from the job's `storage:` options.

- boto3 does listing (paginator), presence checks, small objects and downloads. Its ``standard``
  retry mode (exponential backoff with jitter on throttling, 5xx and connection errors) is the
  maintained implementation, so we configure it instead of writing our own.
- pyarrow's S3FileSystem reads Parquet (column projection with range requests).
- Credentials always come from the standard AWS chain (env, ~/.aws, instance/pod role): never
  arguments, never printed. Both clients choose the same addressing style.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.config import StorageConfig
from pipeline.storage_errors import StorageError

if TYPE_CHECKING:
    import pyarrow.fs

OTHER_SCHEME = re.compile(r"^(?!s3://|file://)[A-Za-z][A-Za-z0-9+.-]*://", re.I)  # gs://, abfs://, http://, ...


def is_s3(uri: str) -> bool:
    return uri[:5].lower() == "s3://"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b.mp4' -> ('bucket', 'a/b.mp4'); the key may be empty (bucket root)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(uri, "S3 URI has no bucket; expected s3://bucket/key", "invalid")
    return bucket, key


def as_prefix(key: str) -> str:
    """A folder-like key prefix: 'videos' -> 'videos/' so it never matches 'videos-old/x'."""
    return key if not key or key.endswith("/") else key + "/"


def region(options: StorageConfig) -> str:
    import boto3

    return options.region or boto3.session.Session().region_name or "us-east-1"


def path_style(options: StorageConfig) -> bool | None:
    """True/False when decided; None = let boto3 choose (AWS, auto).

    'auto' with an endpoint_url means path style: MinIO/Ceph hosts rarely resolve
    bucket.host names, and pyarrow makes the same choice, so both clients agree.
    """
    style = options.addressing_style
    if style == "auto":
        return True if options.endpoint_url else None
    return style == "path"


def build_s3_client(options: StorageConfig) -> Any:
    import boto3
    from botocore.config import Config

    use_path = path_style(options)
    addressing = "auto" if use_path is None else ("path" if use_path else "virtual")
    config = Config(
        # total_max_attempts counts the first try; plain `max_attempts` here would mean retries
        retries={"total_max_attempts": options.max_attempts, "mode": "standard"},
        s3={"addressing_style": addressing},
        max_pool_connections=32,
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
    )
    session = boto3.session.Session()  # own session: the default one is not thread-safe
    return session.client("s3", endpoint_url=options.endpoint_url,
                          region_name=region(options), config=config)


def build_arrow_s3(options: StorageConfig) -> pyarrow.fs.S3FileSystem:
    from pyarrow import fs

    kwargs: dict[str, Any] = {}
    if options.endpoint_url:
        parts = urlsplit(options.endpoint_url)
        # host[:port] only: S3 signs requests, so user:password@ would only leak into messages
        kwargs["endpoint_override"] = (parts.netloc or parts.path).rpartition("@")[2]
        kwargs["scheme"] = parts.scheme or "https"
    return fs.S3FileSystem(
        region=region(options),
        force_virtual_addressing=path_style(options) is False,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
        connect_timeout=options.connect_timeout_s,
        request_timeout=options.read_timeout_s,
        **kwargs,
    )
