"""One storage layer for local paths and ``s3://bucket/key`` URIs, used by every pipeline stage.

IO only: error classification lives in `pipeline.storage_errors`, manifests in the discover
stage (`pipeline._inputs`), the options in `pipeline.config.StorageConfig`.

Why one layer: every stage lists, reads, caches and writes through the same few verbs, so S3
semantics (paginated listings, no rename, transient failures) are handled once, and a
``StorageError`` always names the URI and says whether it was missing, denied, transient or
invalid.

- boto3 does listing (paginator), presence checks, small objects and downloads. Its ``standard``
  retry mode (exponential backoff with jitter on throttling, 5xx and connection errors) is the
  maintained implementation, so we configure it instead of writing our own; our own small retry
  loop only wraps what botocore does not retry: a response body that breaks mid-stream.
- pyarrow's S3FileSystem reads Parquet (column projection with range requests).
- Credentials always come from the standard AWS chain (env, ~/.aws, instance/pod role): never
  arguments, never printed.
- ``Storage`` is pickled to Ray workers: clients are built lazily per process and never pickled.

Worked example::

    st = Storage(StorageConfig(endpoint_url="http://127.0.0.1:9000", addressing_style="path"))
    st.list_videos("s3://bucket/raw", ["mp4"])  # ['s3://bucket/raw/a.mp4', 's3://bucket/raw/b/c.MP4']
    st.local_copy("s3://bucket/raw/a.mp4", "/tmp/cache")  # '/tmp/cache/bucket/<hash>-<etag>/a.mp4'
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import posixpath
import random
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from pipeline.config import StorageConfig
from pipeline.storage_errors import StorageError, is_broken_stream, translated

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs

T = TypeVar("T")

ADDRESSING_STYLES = ("auto", "path", "virtual")
COMPLETE_MARKER = ".v2drop-download-complete"  # written last by download_prefix
_GLOB_CHARS = re.compile(r"[*?\[]")
OTHER_SCHEME = re.compile(r"^(?!s3://|file://)[A-Za-z][A-Za-z0-9+.-]*://", re.I)  # gs://, abfs://, http://, ...
_BACKOFF_BASE_S = 0.2
_BACKOFF_CAP_S = 20.0

# ---------------------------------------------------------------- URIs and error translation


def split_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b.mp4' -> ('bucket', 'a/b.mp4'); the key may be empty (bucket root)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(uri, "S3 URI has no bucket; expected s3://bucket/key", "invalid")
    return bucket, key


def local_path(uri: str) -> str:
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def _as_prefix(key: str) -> str:
    """A folder-like key prefix: 'videos' -> 'videos/' so it never matches 'videos-old/x'."""
    return key if not key or key.endswith("/") else key + "/"


def _is_hidden(path: str) -> bool:
    """Dotfiles are skipped by listings: our own temp files and macOS '._x.mp4' resource forks."""
    return posixpath.basename(path.replace(os.sep, "/")).startswith(".")


def _fsync_folder(folder: str) -> None:
    """A rename is durable only once its folder is synced (else a crash may undo it)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _not_regular(path: str) -> str | None:
    """'a FIFO', 'a device', ... for a path that exists but is no regular file; None otherwise.
    Opening a FIFO blocks until a writer appears, so such a path must never reach a decoder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None


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


@contextlib.contextmanager
def _file_lock(lock_path: str) -> Iterator[None]:
    """An exclusive lock between processes on one node (actors sharing a cache folder)."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _atomic_path(path: str) -> Iterator[str]:
    """Yield a hidden temp path beside `path`; rename it onto `path` only if the body succeeds.

    Same folder so os.replace is one atomic rename on one filesystem: readers see the old file
    or the whole new one, never half. A crash leaves a '.name.<uuid>.tmp' that listings skip.
    """
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _safe_join(root: str, relative: str, uri: str) -> str:
    """Join an S3 key suffix under `root`, refusing keys that would escape it ('../x')."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise StorageError(uri, f"key suffix {relative!r} cannot be a local file name", "invalid")
    return os.path.join(root, *parts)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "object"


# ---------------------------------------------------------------- Storage


class Storage:
    """Local paths and s3:// URIs behind one set of verbs; picklable, clients built per process."""

    def __init__(self, options: StorageConfig | None = None):
        self.options = options or StorageConfig()  # the job's `storage:` section
        self._clients: dict[str, Any] = {}
        self._clients_pid = os.getpid()
        self._clients_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}  # clients hold sockets and threads: rebuild, never pickle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"])

    @staticmethod
    def is_s3(uri: str) -> bool:
        return uri[:5].lower() == "s3://"

    # ------------------------------------------------------------ clients (lazy, per process)

    def _client(self, name: str, build: Callable[[], T]) -> T:
        with self._clients_lock:
            if self._clients_pid != os.getpid():  # forked: sockets of the parent are not ours
                self._clients, self._clients_pid = {}, os.getpid()
            if name not in self._clients:
                self._clients[name] = build()
            return self._clients[name]

    @property
    def s3_client(self) -> Any:
        """This process's boto3 S3 client; public so callers and tests can hook botocore events."""
        return self._client("s3", self._build_s3_client)

    def _region(self) -> str:
        import boto3

        return self.options.region or boto3.session.Session().region_name or "us-east-1"

    def _path_style(self) -> bool | None:
        """True/False when decided; None = let boto3 choose (AWS, auto).

        'auto' with an endpoint_url means path style: MinIO/Ceph hosts rarely resolve
        bucket.host names, and pyarrow makes the same choice, so both clients agree.
        """
        style = self.options.addressing_style
        if style == "auto":
            return True if self.options.endpoint_url else None
        return style == "path"

    def _build_s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        path_style = self._path_style()
        addressing = "auto" if path_style is None else ("path" if path_style else "virtual")
        config = Config(
            # total_max_attempts counts the first try; plain `max_attempts` here would mean retries
            retries={"total_max_attempts": self.options.max_attempts, "mode": "standard"},
            s3={"addressing_style": addressing},
            max_pool_connections=32,
            connect_timeout=self.options.connect_timeout_s,
            read_timeout=self.options.read_timeout_s,
        )
        session = boto3.session.Session()  # own session: the default one is not thread-safe
        return session.client("s3", endpoint_url=self.options.endpoint_url,
                              region_name=self._region(), config=config)

    def _build_arrow_s3(self) -> pyarrow.fs.S3FileSystem:
        from pyarrow import fs

        kwargs: dict[str, Any] = {}
        if self.options.endpoint_url:
            parts = urlsplit(self.options.endpoint_url)
            # host[:port] only: S3 signs requests, so user:password@ would only leak into messages
            kwargs["endpoint_override"] = (parts.netloc or parts.path).rpartition("@")[2]
            kwargs["scheme"] = parts.scheme or "https"
        return fs.S3FileSystem(
            region=self._region(),
            force_virtual_addressing=self._path_style() is False,
            retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=self.options.max_attempts),
            connect_timeout=self.options.connect_timeout_s,
            request_timeout=self.options.read_timeout_s,
            **kwargs,
        )

    def _with_stream_retries(self, uri: str, fn: Callable[[], T]) -> T:
        """Retry `fn` when a response body breaks mid-stream, with backoff and full jitter."""
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                with translated(uri):
                    return fn()
            except StorageError as err:
                if attempt == self.options.max_attempts or not is_broken_stream(err.__cause__):
                    raise
            time.sleep(random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt)))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ listing

    def _iter_objects(self, uri: str, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under `prefix`, one page (<= 1000 keys) at a time."""
        paginator = self.s3_client.get_paginator("list_objects_v2")
        with translated(uri):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    def _list_s3(self, uri: str) -> list[str]:
        """Object URIs under a prefix, matching a glob, or the one object the URI names."""
        bucket, key = split_s3_uri(uri)
        glob_at = _GLOB_CHARS.search(key)
        prefix = key[: glob_at.start()] if glob_at else _as_prefix(key)
        keys = [o["Key"] for o in self._iter_objects(uri, bucket, prefix) if not o["Key"].endswith("/")]
        if glob_at:
            keys = [k for k in keys if fnmatch.fnmatchcase(k, key)]
        elif not keys and key and self.exists(uri):
            keys = [key]
        return [f"s3://{bucket}/{k}" for k in keys]

    @staticmethod
    def _list_local(uri: str, missing_ok: bool) -> list[str]:
        path = local_path(uri)
        if _GLOB_CHARS.search(path):
            import glob

            # every non-folder match: a FIFO named *.mp4 becomes an error row, never silently dropped
            return [p for p in glob.glob(path, recursive=True) if not os.path.isdir(p)]
        if os.path.isfile(path) or _not_regular(path):
            return [path]
        if not os.path.isdir(path):
            if missing_ok:
                return []
            raise StorageError(uri, "no such file or folder", "missing")
        found = []
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.join(folder, f) for f in files]
        return found

    def list_videos(self, uri: str, extensions: Sequence[str]) -> list[str]:
        """Sorted video URIs under a local folder (recursive), a glob, or an s3:// prefix.

        The extension match ignores case ('MP4' == 'mp4'); dotfiles are skipped. A local path
        that does not exist raises kind=missing; an S3 prefix with no objects simply lists none.
        """
        wanted = tuple("." + e.lower().lstrip(".") for e in extensions)
        found = self._list_s3(uri) if self.is_s3(uri) else self._list_local(uri, missing_ok=False)
        return sorted(u for u in found if u.lower().endswith(wanted) and not _is_hidden(u))

    def list_files(self, uri_prefix: str, suffix: str = "") -> list[str]:
        """Sorted file URIs under a folder/prefix (recursive, paginated) ending in `suffix`.

        A folder or prefix that does not exist lists nothing (S3 has no folders to be missing);
        dotfiles (our temp files) are skipped.
        """
        if self.is_s3(uri_prefix):
            bucket, key = split_s3_uri(uri_prefix)
            objects = self._iter_objects(uri_prefix, bucket, _as_prefix(key))
            found = [f"s3://{bucket}/{o['Key']}" for o in objects if not o["Key"].endswith("/")]
        else:
            found = self._list_local(uri_prefix, missing_ok=True)
        return sorted(u for u in found if u.endswith(suffix) and not _is_hidden(u))

    # ------------------------------------------------------------ objects

    def exists(self, uri: str) -> bool:
        """True if the file/object exists; a 403 raises rather than pretending it is absent."""
        if not self.is_s3(uri):
            return os.path.exists(local_path(uri))
        bucket, key = split_s3_uri(uri)
        try:
            with translated(uri):
                self.s3_client.head_object(Bucket=bucket, Key=key)
        except StorageError as err:
            if err.kind == "missing":
                return False
            raise
        return True

    def read_bytes(self, uri: str) -> bytes:
        if not self.is_s3(uri):
            with translated(uri), open(local_path(uri), "rb") as handle:
                return handle.read()
        bucket, key = split_s3_uri(uri)
        return self._with_stream_retries(
            uri, lambda: self.s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def write_bytes_atomic(self, uri: str, data: bytes) -> None:
        """Readers see the old content or all of the new one: tmp + rename, or one PUT on S3."""
        if self.is_s3(uri):
            bucket, key = split_s3_uri(uri)
            with translated(uri):
                self.s3_client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        with translated(uri), _atomic_path(local_path(uri)) as tmp, open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # so the rename never lands before the bytes after a crash

    def delete(self, uri: str) -> None:
        """Delete a file/object; deleting one that is already gone is not an error (resume)."""
        if self.is_s3(uri):
            bucket, key = split_s3_uri(uri)
            with translated(uri):
                self.s3_client.delete_object(Bucket=bucket, Key=key)
            return
        with translated(uri), contextlib.suppress(FileNotFoundError):
            os.remove(local_path(uri))

    def move(self, uri: str, target: str) -> None:
        """Move a file/object (same store): rename locally; copy then delete on S3."""
        if self.is_s3(uri):
            bucket, key = split_s3_uri(uri)
            target_bucket, target_key = split_s3_uri(target)
            with translated(uri):
                self.s3_client.copy_object(Bucket=target_bucket, Key=target_key,
                                           CopySource={"Bucket": bucket, "Key": key})
            self.delete(uri)
            return
        path, target_path = local_path(uri), local_path(target)
        with translated(uri):
            os.makedirs(os.path.dirname(target_path), exist_ok=True)
            os.replace(path, target_path)

    def remove_temporaries(self, uri_prefix: str) -> list[str]:
        """Delete the '.name.<uuid>.tmp' files `_atomic_path` leaves when a process dies while
        writing (S3 writes are one PUT: nothing to remove). Only for a folder one writer holds."""
        if self.is_s3(uri_prefix) or not os.path.isdir(local_path(uri_prefix)):
            return []
        removed = []
        for folder, _, files in os.walk(local_path(uri_prefix)):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
        return sorted(removed)

    # ------------------------------------------------------------ node-local copies

    def _download(self, uri: str, target: str) -> None:
        """Download one object to `target` via a temp file, retrying broken streams.

        boto3's download_file fetches large objects in parallel ranged GETs (model weights).
        """
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3_uri(uri)
        # s3transfer re-reads a body that breaks mid-stream up to num_download_attempts times (each
        # GET retried by botocore); wrapping it in a retry loop of our own would multiply the two.
        transfer = TransferConfig(num_download_attempts=self.options.max_attempts)
        with translated(uri), _atomic_path(target) as tmp:
            self.s3_client.download_file(bucket, key, tmp, Config=transfer)

    def local_copy(self, uri: str, cache_dir: str) -> str:
        """A local path for `uri`: local files as they are, S3 objects downloaded once per node.

        The cache path is keyed by bucket, key hash and ETag (size if none), so a changed object
        is fetched again; a file lock plus tmp+rename mean concurrent processes download once
        and never see half a file.
        """
        if OTHER_SCHEME.match(uri):
            raise StorageError(uri, f"{uri.split(':', 1)[0]}:// is not supported; use s3:// or a local path", "invalid")
        if not self.is_s3(uri):
            kind = _not_regular(local_path(uri))
            if kind:
                raise StorageError(uri, f"is {kind}, not a regular file", "invalid")
            if not os.path.isfile(local_path(uri)):
                raise StorageError(uri, "no such file", "missing")
            return uri
        return _within(uri, self.options.object_timeout_s, lambda: self._cached_copy(uri, cache_dir))

    def _cached_copy(self, uri: str, cache_dir: str) -> str:
        bucket, key = split_s3_uri(uri)
        with translated(uri):
            head = self.s3_client.head_object(Bucket=bucket, Key=key)
        etag = head.get("ETag", "").strip('"')
        version = etag or str(head["ContentLength"])
        key_hash = hashlib.sha256(key.encode()).hexdigest()[:16]
        target = os.path.join(os.path.abspath(cache_dir), _safe_name(bucket),
                              f"{key_hash}-{_safe_name(version)}", _safe_name(posixpath.basename(key)))
        if not os.path.exists(target):
            with _file_lock(os.path.join(os.path.dirname(target), ".lock")):
                if not os.path.exists(target):
                    self._download(uri, target)
        return target

    def download_prefix(self, s3_prefix: str, local_dir: str) -> str:
        """Mirror every object under `s3_prefix` into `local_dir` once per node (model weights).

        A completion marker written last makes later calls free; a file lock makes the second
        actor on a node wait for the first instead of downloading again. Files already present
        with the right size are kept, so a crashed download resumes.
        """
        if not self.is_s3(s3_prefix):
            if not os.path.exists(local_path(s3_prefix)):
                raise StorageError(s3_prefix, "no such folder", "missing")
            return s3_prefix
        local_dir = os.path.abspath(local_dir)
        marker = os.path.join(local_dir, COMPLETE_MARKER)
        if not os.path.exists(marker):
            with _file_lock(os.path.join(local_dir, ".v2drop-download.lock")):
                if not os.path.exists(marker):
                    self._mirror_prefix(s3_prefix, local_dir, marker)
        return local_dir

    def _mirror_prefix(self, s3_prefix: str, local_dir: str, marker: str) -> None:
        bucket, key = split_s3_uri(s3_prefix)
        prefix = _as_prefix(key)
        objects = [o for o in self._iter_objects(s3_prefix, bucket, prefix) if not o["Key"].endswith("/")]
        if not objects:
            raise StorageError(s3_prefix, "no objects under this prefix", "missing")
        for obj in objects:
            target = _safe_join(local_dir, obj["Key"][len(prefix):], s3_prefix)
            if not (os.path.exists(target) and os.path.getsize(target) == obj["Size"]):
                self._download(f"s3://{bucket}/{obj['Key']}", target)
        listing = [{"key": o["Key"], "etag": o.get("ETag", "").strip('"')} for o in objects]
        with _atomic_path(marker) as tmp, open(tmp, "x") as handle:
            json.dump({"source": s3_prefix, "objects": listing}, handle)

    # ------------------------------------------------------------ Parquet

    def arrow_filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """(filesystem, path) for pyarrow: LocalFileSystem + abspath, or S3FileSystem + 'bucket/key'."""
        if not self.is_s3(uri):
            from pyarrow import fs

            return fs.LocalFileSystem(), local_path(uri)
        bucket, key = split_s3_uri(uri)
        return self._client("arrow_s3", self._build_arrow_s3), f"{bucket}/{key}"

    def write_parquet_atomic(self, table: pyarrow.Table, uri: str) -> None:
        """Write a Parquet file that is never visible half-written.

        S3: serialised in memory, then one PUT. pyarrow's S3 output stream would also be atomic
        on success, but if writing fails midway its close() still completes the upload.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.is_s3(uri):
            buffer = pa.BufferOutputStream()
            pq.write_table(table, buffer)
            self.write_bytes_atomic(uri, buffer.getvalue().to_pybytes())
            return
        with translated(uri), _atomic_path(local_path(uri)) as tmp, open(tmp, "xb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())  # else a crash after the rename can leave a 0-byte part file

    def read_parquet(self, uri_or_prefix: str, columns: Sequence[str] | None = None,
                     absent_as_null: bool = False) -> pyarrow.Table:
        """One .parquet file, or every .parquet under a folder/prefix concatenated.

        Files are read one by one, so Hive folder names (job=x/run_date=y) add no columns. With
        columns=None schemas are unified (a column absent from one file is null there); a
        requested column absent from a file raises kind=invalid naming it, or reads as nulls
        with `absent_as_null` (files written before the column existed). A folder or prefix
        with no files gives an empty table of the requested columns (null type); a missing
        .parquet file raises kind=missing.
        """
        import pyarrow as pa

        if uri_or_prefix.lower().endswith(".parquet"):
            files = [uri_or_prefix]
        else:
            files = self.list_files(uri_or_prefix, suffix=".parquet")
        if not files:
            return pa.table({c: pa.array([], pa.null()) for c in columns or []})
        tables = [self._read_parquet_file(f, columns, absent_as_null) for f in files]
        return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]

    def _read_parquet_file(self, uri: str, columns: Sequence[str] | None,
                           absent_as_null: bool = False) -> pyarrow.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        filesystem, path = self.arrow_filesystem(uri)
        with translated(uri), filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            absent = sorted(set(columns or []) - set(names))
            if absent and not absent_as_null:
                raise StorageError(uri, f"no column(s) {absent}; has {names}", "invalid")
            table = parquet.read(columns=[c for c in columns if c in names] if columns is not None else None)
        for name in absent:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        return table.select(list(columns)) if columns is not None else table
