"""One storage layer for local paths and ``s3://bucket/key`` URIs, used by every pipeline stage.

IO only: S3 URIs and clients live in `pipeline.s3`, local atomic writes and locks in
`pipeline.local_files`, node-local copies (videos, model prefixes) in `pipeline.node_cache`, error
classification in `pipeline.storage_errors`, manifests in the discover stage (`pipeline._discover`),
the options in `pipeline.config.StorageConfig`.

Why one layer: every stage lists, reads, caches and writes through the same few verbs, so S3
semantics (paginated listings, no rename, transient failures) are handled once, and a
``StorageError`` always names the URI and says whether it was missing, denied, transient or
invalid. Our own small retry loop only wraps what botocore does not retry: a response body that
breaks mid-stream. ``Storage`` is pickled to Ray workers: clients are built lazily per process
and never pickled.

Worked example::

    st = Storage(StorageConfig(endpoint_url="http://127.0.0.1:9000", addressing_style="path"))
    st.list_videos("s3://bucket/raw", ["mp4"])  # ['s3://bucket/raw/a.mp4', 's3://bucket/raw/b/c.MP4']
    st.local_copy("s3://bucket/raw/a.mp4", "/tmp/cache")  # '/tmp/cache/bucket/<hash>-<etag>/a.mp4'
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline import node_cache
from pipeline.config import StorageConfig
from pipeline.local_files import GLOB_CHARS, atomic_path, fsync_folder, is_hidden, list_local, local_path, make_folders
from pipeline.s3 import as_prefix, build_arrow_s3, build_s3_client, split_s3_uri
from pipeline.s3 import is_s3 as _is_s3
from pipeline.storage_errors import StorageError, is_broken_stream, translated

if TYPE_CHECKING:
    import pyarrow
    import pyarrow.fs

T = TypeVar("T")

_BACKOFF_BASE_S = 0.2
_BACKOFF_CAP_S = 20.0


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
        return _is_s3(uri)

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
        return self._client("s3", lambda: build_s3_client(self.options))

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

    def iter_s3_objects(self, uri: str, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under `prefix`, one page (<= 1000 keys) at a time."""
        paginator = self.s3_client.get_paginator("list_objects_v2")
        with translated(uri):
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    def _list_s3(self, uri: str) -> list[str]:
        """Object URIs under a prefix, matching a glob, or the one object the URI names."""
        bucket, key = split_s3_uri(uri)
        glob_at = GLOB_CHARS.search(key)
        prefix = key[: glob_at.start()] if glob_at else as_prefix(key)
        keys = [o["Key"] for o in self.iter_s3_objects(uri, bucket, prefix) if not o["Key"].endswith("/")]
        if glob_at:
            keys = [k for k in keys if fnmatch.fnmatchcase(k, key)]
        elif not keys and key and self.exists(uri):
            keys = [key]
        return [f"s3://{bucket}/{k}" for k in keys]

    def list_videos(self, uri: str, extensions: Sequence[str]) -> list[str]:
        """Sorted video URIs under a local folder (recursive), a glob, or an s3:// prefix.

        The extension match ignores case ('MP4' == 'mp4'); dotfiles are skipped. A local path
        that does not exist raises kind=missing; an S3 prefix with no objects simply lists none.
        """
        wanted = tuple("." + e.lower().lstrip(".") for e in extensions)
        found = self._list_s3(uri) if self.is_s3(uri) else list_local(uri, missing_ok=False)
        return sorted(u for u in found if u.lower().endswith(wanted) and not is_hidden(u))

    def list_files(self, uri_prefix: str, suffix: str = "") -> list[str]:
        """Sorted file URIs under a folder/prefix (recursive, paginated) ending in `suffix`.

        A folder or prefix that does not exist lists nothing (S3 has no folders to be missing);
        dotfiles (our temp files) are skipped. No glob: an output folder may be named 'out[1]'.
        """
        if self.is_s3(uri_prefix):
            bucket, key = split_s3_uri(uri_prefix)
            objects = self.iter_s3_objects(uri_prefix, bucket, as_prefix(key))
            found = [f"s3://{bucket}/{o['Key']}" for o in objects if not o["Key"].endswith("/")]
        else:
            found = list_local(uri_prefix, missing_ok=True, expand_globs=False)
        return sorted(u for u in found if u.endswith(suffix) and not is_hidden(u))

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
        with translated(uri), atomic_path(local_path(uri)) as tmp, open(tmp, "xb") as handle:
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
            make_folders(os.path.dirname(target_path))
            os.replace(path, target_path)
            fsync_folder(os.path.dirname(target_path))
            fsync_folder(os.path.dirname(path))

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

    def local_copy(self, uri: str, cache_dir: str) -> str:
        """A local path for `uri`: local files as they are, S3 objects downloaded once per node
        (`pipeline.node_cache.local_copy`)."""
        return node_cache.local_copy(self, uri, cache_dir)

    def download_prefix(self, s3_prefix: str, local_dir: str) -> str:
        """Mirror an S3 prefix (model weights) into `local_dir` once per node
        (`pipeline.node_cache.download_prefix`); a local folder is returned as it is."""
        return node_cache.download_prefix(self, s3_prefix, local_dir)

    # ------------------------------------------------------------ Parquet

    def arrow_filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """(filesystem, path) for pyarrow: LocalFileSystem + abspath, or S3FileSystem + 'bucket/key'."""
        if not self.is_s3(uri):
            from pyarrow import fs

            return fs.LocalFileSystem(), local_path(uri)
        bucket, key = split_s3_uri(uri)
        return self._client("arrow_s3", lambda: build_arrow_s3(self.options)), f"{bucket}/{key}"

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
        with translated(uri), atomic_path(local_path(uri)) as tmp, open(tmp, "xb") as handle:
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
