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
from pipeline.logs import get_logger
from pipeline.s3 import OTHER_SCHEME, as_prefix, is_s3, split_s3_uri
from pipeline.storage_errors import StorageError, translated

if TYPE_CHECKING:
    from pipeline.storage import Storage

T = TypeVar("T")

COMPLETE_MARKER = ".v2drop-download-complete"  # written last by download_prefix: each object's version
PROGRESS_RECORD = ".v2drop-download-progress"  # the objects a mirror in progress has downloaded


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
    """Mirror every object under `s3_prefix` into `local_dir`, once per node and version (model
    weights).

    Each call lists the prefix (one request) and compares each object's ETag with the marker
    the last complete mirror wrote: a prefix rewritten since (a retrained checkpoint, whose files
    have the same sizes) is mirrored again, the files it no longer holds removed. A file lock
    makes the second actor on a node wait for the first; a crashed mirror resumes from the files
    it recorded as done. When the listing fails, a complete mirror is used as it is, with a warning.
    """
    if not is_s3(s3_prefix):
        if not os.path.exists(local_path(s3_prefix)):
            raise StorageError(s3_prefix, "no such folder", "missing")
        return s3_prefix
    local_dir = os.path.abspath(local_dir)
    marker = os.path.join(local_dir, COMPLETE_MARKER)
    try:
        objects = _listing(storage, s3_prefix)
    except StorageError as e:
        if not os.path.exists(marker):
            raise
        get_logger("node_cache").warning("%s: cannot list (%s); using the copy mirrored before in %s", s3_prefix, e, local_dir)
        return local_dir
    if _versions(marker) != _current(objects):
        with file_lock(os.path.join(local_dir, ".v2drop-download.lock")):
            if _versions(marker) != _current(objects):
                _mirror_prefix(storage, s3_prefix, local_dir, objects)
    return local_dir


def _listing(storage: Storage, s3_prefix: str) -> list[dict[str, Any]]:
    bucket, key = split_s3_uri(s3_prefix)
    objects = [o for o in storage.iter_s3_objects(s3_prefix, bucket, as_prefix(key)) if not o["Key"].endswith("/")]
    if not objects:
        raise StorageError(s3_prefix, "no objects under this prefix", "missing")
    return objects


def _current(objects: list[dict[str, Any]]) -> dict[str, str]:
    """key -> version (the ETag; the size where a store gives none) of each listed object."""
    return {o["Key"]: o.get("ETag", "").strip('"') or f"size:{o['Size']}" for o in objects}


def _versions(record: str) -> dict[str, str] | None:
    """key -> version of the objects a marker or progress record holds; None when there is none."""
    try:
        with open(record) as handle:
            return {o["key"]: o["etag"] for o in json.load(handle)["objects"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_versions(record: str, s3_prefix: str, versions: dict[str, str]) -> None:
    with atomic_path(record) as tmp, open(tmp, "x") as handle:
        json.dump({"source": s3_prefix, "objects": [{"key": k, "etag": v} for k, v in versions.items()]}, handle)


def _mirror_prefix(storage: Storage, s3_prefix: str, local_dir: str, objects: list[dict[str, Any]]) -> None:
    """Download what changed, recording each file done (a crash resumes there), remove the files
    the prefix no longer holds, then write the marker."""
    bucket, key = split_s3_uri(s3_prefix)
    prefix = as_prefix(key)
    marker, progress = os.path.join(local_dir, COMPLETE_MARKER), os.path.join(local_dir, PROGRESS_RECORD)
    done = {**(_versions(marker) or {}), **(_versions(progress) or {})}  # files some mirror completed
    if os.path.exists(marker):
        os.remove(marker)  # incomplete from here until the new one is written
    wanted = _current(objects)
    targets = {}
    for obj in objects:
        targets[obj["Key"]] = target = _safe_join(local_dir, obj["Key"][len(prefix):], s3_prefix)
        if done.get(obj["Key"]) != wanted[obj["Key"]] or not os.path.exists(target):
            _download(storage, f"s3://{bucket}/{obj['Key']}", target)
            done[obj["Key"]] = wanted[obj["Key"]]
            _write_versions(progress, s3_prefix, done)
    kept = set(targets.values())
    for folder, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(folder, name)
            if path not in kept and not name.startswith(".v2drop-"):
                os.remove(path)  # a shard of the old version, or a crashed download's temporary
    _write_versions(marker, s3_prefix, wanted)
    if os.path.exists(progress):
        os.remove(progress)


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
