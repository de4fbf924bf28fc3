"""Stage 6, write (driver): Parquet parts under Hive partitions, atomically, and resume.

Layout (docs/architecture.md, "Output layout and resume")::

    <output>/data/job=<job>/run_date=<YYYY-MM-DD>/part-<run_id>-<seq>.parquet         ok + skipped
    <output>/data/job=<job>/run_date=<YYYY-MM-DD>/part-<run_id>-<seq>-errors.parquet  error rows

Each file goes through `Storage.write_parquet_atomic` (temp + rename locally, one PUT on S3), so
a reader or a re-run never sees half a file. Resume: `finished_keys` reads the keys
(clip_id, prompt) of ok/skipped rows; the earlier error files are deleted once the run is
planned (their keys are simply not finished, so this run retries them); `PartWriter` drops any
row whose key is already written, so no key appears twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline._shard import key
from pipeline.schema import FILE_SCHEMA
from pipeline.storage import Storage

ERRORS_SUFFIX = "-errors.parquet"
ROWS_PER_FILE = 20_000  # one file per this many rows ...
SECONDS_PER_FILE = 120.0  # ... or per this many seconds, so a crash loses little finished work


def job_data_uri(output_uri: str, job: str) -> str:
    return f"{output_uri.rstrip('/')}/data/job={job}"


def run_dir_uri(output_uri: str, job: str, run_id: str) -> str:
    return f"{output_uri.rstrip('/')}/runs/job={job}/{run_id}"


def existing_files(storage: Storage, job_uri: str) -> tuple[list[str], list[str]]:
    """(part files, error files) already under the job's data folder."""
    files = storage.list_files(job_uri, suffix=".parquet")
    errors = [f for f in files if f.endswith(ERRORS_SUFFIX)]
    return [f for f in files if not f.endswith(ERRORS_SUFFIX)], errors


def finished_keys(storage: Storage, part_files: list[str], fingerprint: str) -> set[tuple[str, str]]:
    """Keys a resumed run skips: skipped rows, and ok rows made by the same model and engine
    configuration (`fingerprint`, workers.provenance). Rows of another configuration are redone."""
    keys: set[tuple[str, str]] = set()
    for uri in part_files:
        table = storage.read_parquet(uri, columns=["clip_id", "prompt", "status", "engine_fingerprint"])
        same_engine = pc.fill_null(pc.equal(table["engine_fingerprint"], fingerprint), False)
        table = table.filter(pc.or_(pc.equal(table["status"], "skipped"),
                                    pc.and_(pc.equal(table["status"], "ok"), same_engine)))
        keys.update(key(c, p) for c, p in zip(table["clip_id"].to_pylist(), table["prompt"].to_pylist()))
    return keys


@dataclass
class PartWriter:
    """Buffers output rows and writes them as numbered part files (ok+skipped / errors apart)."""

    storage: Storage
    partition_uri: str  # <output>/data/job=<job>/run_date=<date>
    run_id: str
    done: set[tuple[str, str]]  # keys already written (earlier runs, then this one)
    files: list[str] = field(default_factory=list)
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered_rows: int = 0
    _seq: int = 0
    _last_flush: float = field(default_factory=time.monotonic)

    def add(self, table: pa.Table) -> pa.Table:
        """Queue a FILE_SCHEMA table; returns the rows actually kept (new keys only)."""
        table = self._new_rows(table)
        self._buffer.append(table)
        self._buffered_rows += table.num_rows
        if self._buffered_rows >= ROWS_PER_FILE or time.monotonic() - self._last_flush >= SECONDS_PER_FILE:
            self.flush()
        return table

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffered_rows:
            return
        table = pa.concat_tables(self._buffer).cast(FILE_SCHEMA)
        self._buffer, self._buffered_rows = [], 0
        is_error = pc.equal(table["status"], "error")
        self._write(table.filter(pc.invert(is_error)), ".parquet")
        self._write(table.filter(is_error), ERRORS_SUFFIX)
        self._seq += 1

    def _write(self, table: pa.Table, suffix: str) -> None:
        if table.num_rows:
            uri = f"{self.partition_uri}/part-{self.run_id}-{self._seq:05d}{suffix}"
            self.storage.write_parquet_atomic(table, uri)
            self.files.append(uri)

    def _new_rows(self, table: pa.Table) -> pa.Table:
        keep = []
        for clip, prompt in zip(table["clip_id"].to_pylist(), table["prompt"].to_pylist()):
            k = key(clip, prompt)
            keep.append(k not in self.done)
            self.done.add(k)
        return table.filter(pa.array(keep, pa.bool_())) if not all(keep) else table
