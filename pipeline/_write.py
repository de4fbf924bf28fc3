"""Stage 6, write (driver): Parquet parts under Hive partitions; what a run finds, adds and replaces.

Layout (docs/architecture.md, "Output layout and resume")::

    <output>/data/job=<job>/run_date=<YYYY-MM-DD>/part-<run_id>-<seq>.parquet         ok + skipped
    <output>/data/job=<job>/run_date=<YYYY-MM-DD>/part-<run_id>-<seq>-errors.parquet  error rows
    <output>/unreadable/job=<job>/...                                                 files set aside

The life of a run's rows, all under the job's lease (`pipeline.lease`):

1. `read_state`: list the job's files; remove temporaries a crash left; move unreadable files
   aside (their keys are then simply not done); read each file's keys. `finished_keys` is what
   this run skips: the keys with a row that the `DoneRule` accepts.
2. `PartWriter`: rows reach storage at least every `run.flush_interval_s` or `run.flush_rows`,
   each file written atomically (fsync + rename locally, one PUT on S3).
3. `pipeline._consolidate.consolidate`, after every row of the run is written: compact this
   run's files, remove the older rows it replaces, repair duplicated keys (that module's
   docstring says how a crash at any point stays safe).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline._shard import key
from pipeline.local_files import local_path
from pipeline.redact import redact
from pipeline.schema import FILE_SCHEMA, SCHEMA_VERSION, schema_version
from pipeline.storage import Storage, StorageError
from pipeline.storage_errors import unreadable_content

ERRORS_SUFFIX = "-errors.parquet"
DONE_STATUSES = ("ok", "skipped")
KEY_COLUMNS = ("clip_id", "prompt")
REDACTED_COLUMNS = ("error", "partial_reason")  # free text that may quote a URL or an SDK message

Key = tuple[str, str]


class OutputError(RuntimeError):
    """The output stopped accepting writes mid-run (CLI exit code 7); what was written stays."""


@contextlib.contextmanager
def writing(uri: str) -> Iterator[None]:
    """StorageError while writing `uri` -> OutputError naming it (one line for the CLI)."""
    try:
        yield
    except StorageError as e:
        raise OutputError(f"output.uri: cannot write {uri} ({e.kind}: {e.reason}); the files written "
                          "before stay, and a re-run resumes from them") from None


@dataclass(frozen=True)
class DoneRule:
    """Which rows count as finished, so a resumed run skips their keys and keeps their rows.

    The one place that decides it. A provenance filter (e.g. "ok rows only with this run's
    engine fingerprint") is a subclass that adds its column to `columns` and a condition to
    `__call__`; a file written before that column existed reads it as null.
    """

    columns: tuple[str, ...] = ("status",)  # read from every file, besides the key

    def __call__(self, table: pa.Table) -> pa.ChunkedArray:
        return pc.is_in(table["status"], pa.array(DONE_STATUSES))


@dataclass(frozen=True)
class SameEngineRule(DoneRule):
    """Finished: a skipped row, or an ok row written with this run's engine fingerprint
    (workers.provenance). Rows of another model or engine configuration, and rows written before
    the fingerprint existed (null), are redone, and the new rows replace them."""

    fingerprint: str = ""
    columns: tuple[str, ...] = ("status", "engine_fingerprint")

    def __call__(self, table: pa.Table) -> pa.ChunkedArray:
        same_engine = pc.fill_null(pc.equal(table["engine_fingerprint"], self.fingerprint), False)
        return pc.or_(pc.equal(table["status"], "skipped"), pc.and_(pc.equal(table["status"], "ok"), same_engine))


def job_data_uri(output_uri: str, job: str) -> str:
    return f"{output_uri.rstrip('/')}/data/job={job}"


def run_dir_uri(output_uri: str, job: str, run_id: str) -> str:
    return f"{output_uri.rstrip('/')}/runs/job={job}/{run_id}"


def summaries_uri(output_uri: str, job: str) -> str:
    return f"{output_uri.rstrip('/')}/summaries/job={job}"


def aside_uri(output_uri: str, job: str) -> str:
    return f"{output_uri.rstrip('/')}/unreadable/job={job}"


# --- 1. what the output holds ------------------------------------------------------------------


@dataclass(frozen=True)
class FileKeys:
    """The keys of one existing file, row by row."""

    uri: str
    keys: list[Key]
    done: list[bool]  # DoneRule per row
    schema_version: int = SCHEMA_VERSION  # pipeline.schema.schema_version of the file


@dataclass
class OutputState:
    files: list[FileKeys]  # every readable data file of the job when the run started
    set_aside: list[str] = field(default_factory=list)  # unreadable files moved under unreadable/
    temps_removed: list[str] = field(default_factory=list)


def read_state(storage: Storage, output_uri: str, job: str, log: Callable[[str], None] = print,
               rule: DoneRule = DoneRule()) -> OutputState:
    """The job's files and their keys; temporaries removed, unreadable files moved aside (named)."""
    data_uri = job_data_uri(output_uri, job)
    state = OutputState([], temps_removed=storage.remove_temporaries(data_uri))
    for uri in state.temps_removed:
        log(f"[resume] removed {uri}, a temporary file a crashed writer left")
    for uri in storage.list_files(data_uri, suffix=".parquet"):
        try:
            table = storage.read_parquet(uri, columns=[*KEY_COLUMNS, *rule.columns], absent_as_null=True)
        except StorageError as e:
            if not unreadable_content(e):  # the file could not be reached: stop, naming it
                raise
            listed_root = data_uri if Storage.is_s3(data_uri) else local_path(data_uri)  # as listed
            target = aside_uri(output_uri, job) + uri[len(listed_root):]
            storage.move(uri, target)
            state.set_aside.append(uri)
            log(f"[resume] {uri} is not a readable Parquet file ({e.reason}); moved it to {target}; "
                "the keys it held are run again")
            continue
        keys = [key(c, p) for c, p in zip(table["clip_id"].to_pylist(), table["prompt"].to_pylist())]
        state.files.append(FileKeys(uri, keys, rule(table).to_pylist(), schema_version(table.schema)))
    return state


def finished_keys(state: OutputState) -> set[Key]:
    """Keys with a finished row (`DoneRule`): what a resumed run skips."""
    return {k for f in state.files for k, done in zip(f.keys, f.done) if done}


# --- 2. writing this run's rows ----------------------------------------------------------------


@dataclass
class PartWriter:
    """Buffers output rows and writes them as numbered part files (ok+skipped / errors apart).

    `flush_if_due` is called by the driver for every block and by a timer thread, so no finished
    row waits longer than `flush_interval_s` (or beyond `flush_rows` rows) in memory.
    """

    storage: Storage
    partition_uri: str  # <output>/data/job=<job>/run_date=<date>
    run_id: str
    done: set[Key]  # keys already written (earlier runs, then this one)
    flush_interval_s: float = 30.0
    flush_rows: int = 2000
    before_write: Callable[[], None] = lambda: None  # e.g. Lease.check: stop once the lease is lost
    files: list[str] = field(default_factory=list)
    written: set[Key] = field(default_factory=set)  # keys this run wrote
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered_rows: int = 0
    _first_buffered_at: float | None = None
    _seq: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, table: pa.Table) -> pa.Table:
        """Queue a FILE_SCHEMA table; returns the rows actually kept (new keys only)."""
        with self._lock:
            table = self._new_rows(table)
            if table.num_rows:
                self._buffer.append(table)
                self._buffered_rows += table.num_rows
                self._first_buffered_at = self._first_buffered_at or time.monotonic()
        self.flush_if_due()
        return table

    def flush_if_due(self) -> None:
        with self._lock:
            first = self._first_buffered_at
            if first is not None and (self._buffered_rows >= self.flush_rows
                                      or time.monotonic() - first >= self.flush_interval_s):
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._buffered_rows:
            return
        table = redact_text_columns(pa.concat_tables(self._buffer).cast(FILE_SCHEMA))
        self.before_write()
        is_error = pc.equal(table["status"], "error")
        with writing(self.partition_uri):
            self._write(table.filter(pc.invert(is_error)), ".parquet")
            self._write(table.filter(is_error), ERRORS_SUFFIX)
        self._buffer, self._buffered_rows, self._first_buffered_at = [], 0, None
        self._seq += 1

    def _write(self, table: pa.Table, suffix: str) -> None:
        if table.num_rows:
            uri = f"{self.partition_uri}/part-{self.run_id}-{self._seq:05d}{suffix}"
            self.storage.write_parquet_atomic(table, uri)
            self.files.append(uri)
            self.written.update(key(c, p) for c, p in zip(table["clip_id"].to_pylist(), table["prompt"].to_pylist()))

    def _new_rows(self, table: pa.Table) -> pa.Table:
        keep = []
        for clip, prompt in zip(table["clip_id"].to_pylist(), table["prompt"].to_pylist()):
            k = key(clip, prompt)
            keep.append(k not in self.done)
            self.done.add(k)
        return table.filter(pa.array(keep, pa.bool_())) if not all(keep) else table


def redact_text_columns(table: pa.Table) -> pa.Table:
    """Rows never carry credentials: free-text columns go through `redact`."""
    for name in REDACTED_COLUMNS:
        index = table.schema.get_field_index(name)
        if index >= 0:
            cleaned = [redact(v) if v else v for v in table[name].to_pylist()]
            table = table.set_column(index, table.schema.field(index), pa.array(cleaned, table.schema.field(index).type))
    return table


class FlushTimer:
    """A daemon thread calling `writer.flush_if_due()` every second; its first error is kept for
    the driver to raise (`check`), since an exception in a thread would otherwise be lost."""

    def __init__(self, writer: PartWriter, period_s: float = 1.0):
        self.writer, self.period_s, self.error = writer, period_s, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="part-flush", daemon=True)

    def __enter__(self) -> FlushTimer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s) and self.error is None:
            try:
                self.writer.flush_if_due()
            except Exception as e:  # noqa: BLE001 - handed to the driver thread by check()
                self.error = e
