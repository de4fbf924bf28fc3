"""Node-local copies of S3 objects: a video downloaded once per node, a model prefix mirrored once.

Every actor and decode task on a node shares one cache folder: a file lock makes the second
process wait for the first instead of downloading again, and tmp + rename mean nobody ever sees
half a file. Local paths pass through unchanged (after refusing FIFOs and devices).

Worked example::

    local_copy(st, "s3://bucket/raw/a.mp4", "/tmp/cache")  # '/tmp/cache/bucket/<hash>-<etag>/a.mp4'
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.local_files import atomic_path, file_lock, local_path, not_regular
from pipeline.s3 import OTHER_SCHEME, as_prefix, is_s3, split_s3_uri
from pipeline.storage_errors import StorageError, translated

if TYPE_CHECKING:
    from pipeline.storage import Storage

T = TypeVar("T")

COMPLETE_MARKER = ".v2drop-download-complete"  # written last by download_prefix


def _download(storage: Storage, uri: str, target: str) -> None:
    """Download one object to `target` via a temp file, retrying broken streams.

    boto3's download_file fetches large objects in parallel ranged GETs (model weights).
    """
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3_uri(uri)
    # s3transfer re-reads a body that breaks mid-stream up to num_download_attempts times (each
    # GET retried by botocore); wrapping it in a retry loop of our own would multiply the two.
    transfer = TransferConfig(num_download_attempts=storage.options.max_attempts)
    with translated(uri), atomic_path(target) as tmp:
        storage.s3_client.download_file(bucket, key, tmp, Config=transfer)


def local_copy(storage: Storage, uri: str, cache_dir: str) -> str:
    """A local path for `uri`: local files as they are, S3 objects downloaded once per node.

    The cache path is keyed by bucket, key hash and ETag (size if none), so a changed object
    is fetched again; a file lock plus tmp+rename mean concurrent processes download once
    and never see half a file.
    """
    if OTHER_SCHEME.match(uri):
        raise StorageError(uri, f"{uri.split(':', 1)[0]}:// is not supported; use s3:// or a local path", "invalid")
    if not is_s3(uri):
        kind = not_regular(local_path(uri))
        if kind:
            raise StorageError(uri, f"is {kind}, not a regular file", "invalid")
        if not os.path.isfile(local_path(uri)):
            raise StorageError(uri, "no such file", "missing")
        return uri
    return _within(uri, storage.options.object_timeout_s, lambda: _cached_copy(storage, uri, cache_dir))


def _cached_copy(storage: Storage, uri: str, cache_dir: str) -> str:
    bucket, key = split_s3_uri(uri)
    with translated(uri):
        head = storage.s3_client.head_object(Bucket=bucket, Key=key)
    etag = head.get("ETag", "").strip('"')
    version = etag or str(head["ContentLength"])
    key_hash = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = os.path.join(os.path.abspath(cache_dir), _safe_name(bucket),
                          f"{key_hash}-{_safe_name(version)}", _safe_name(posixpath.basename(key)))
    if not os.path.exists(target):
        with file_lock(os.path.join(os.path.dirname(target), ".lock")):
            if not os.path.exists(target):
                _download(storage, uri, target)
    return target


def download_prefix(storage: Storage, s3_prefix: str, local_dir: str) -> str:
    """Mirror every object under `s3_prefix` into `local_dir` once per node (model weights).

    A completion marker written last makes later calls free; a file lock makes the second
    actor on a node wait for the first instead of downloading again. Files already present
    with the right size are kept, so a crashed download resumes.
    """
    if not is_s3(s3_prefix):
        if not os.path.exists(local_path(s3_prefix)):
            raise StorageError(s3_prefix, "no such folder", "missing")
        return s3_prefix
    local_dir = os.path.abspath(local_dir)
    marker = os.path.join(local_dir, COMPLETE_MARKER)
    if not os.path.exists(marker):
        with file_lock(os.path.join(local_dir, ".v2drop-download.lock")):
            if not os.path.exists(marker):
                _mirror_prefix(storage, s3_prefix, local_dir, marker)
    return local_dir


def _mirror_prefix(storage: Storage, s3_prefix: str, local_dir: str, marker: str) -> None:
    bucket, key = split_s3_uri(s3_prefix)
    prefix = as_prefix(key)
    objects = [o for o in storage.iter_s3_objects(s3_prefix, bucket, prefix) if not o["Key"].endswith("/")]
    if not objects:
        raise StorageError(s3_prefix, "no objects under this prefix", "missing")
    for obj in objects:
        target = _safe_join(local_dir, obj["Key"][len(prefix):], s3_prefix)
        if not (os.path.exists(target) and os.path.getsize(target) == obj["Size"]):
            _download(storage, f"s3://{bucket}/{obj['Key']}", target)
    listing = [{"key": o["Key"], "etag": o.get("ETag", "").strip('"')} for o in objects]
    with atomic_path(marker) as tmp, open(tmp, "x") as handle:
        json.dump({"source": s3_prefix, "objects": listing}, handle)


def _within(uri: str, timeout_s: float, fn: Callable[[], T]) -> T:
    """`fn()` in a daemon thread, abandoned after `timeout_s`: a server that trickles or goes
    silent costs one object at most this long, whatever the retries inside `fn` would add up to."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="storage-deadline", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise StorageError(uri, f"no complete answer within storage.object_timeout_s={timeout_s:g} s", "transient")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _safe_join(root: str, relative: str, uri: str) -> str:
    """Join an S3 key suffix under `root`, refusing keys that would escape it ('../x')."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise StorageError(uri, f"key suffix {relative!r} cannot be a local file name", "invalid")
    return os.path.join(root, *parts)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "object"
