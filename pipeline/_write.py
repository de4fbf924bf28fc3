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
3. `consolidate`, after every row of the run is written: this run's small files are compacted
   into files of up to ROWS_PER_FILE rows, then every older row whose key this run wrote again
   (an earlier error, `resume=false`, a row the `DoneRule` refuses) is removed, keys that older
   versions left duplicated keep one row, and older small files of one folder (a killed run's
   flushes) are merged. A file is rewritten by writing its replacement first and deleting it
   second, so a crash at any point leaves every key readable at least once, and the next run's
   step 3 leaves it exactly once.
"""

from __future__ import annotations

import contextlib
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline._shard import key
from pipeline.redact import redact
from pipeline.schema import FILE_SCHEMA
from pipeline.storage import Storage, StorageError

ERRORS_SUFFIX = "-errors.parquet"
ROWS_PER_FILE = 20_000  # compacted files hold up to this many rows: large enough for readers
SMALL_FILE_ROWS = ROWS_PER_FILE // 4  # older files below this are merged with their neighbours
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


def aside_uri(output_uri: str, job: str) -> str:
    return f"{output_uri.rstrip('/')}/unreadable/job={job}"


# --- 1. what the output holds ------------------------------------------------------------------


@dataclass(frozen=True)
class FileKeys:
    """The keys of one existing file, row by row."""

    uri: str
    keys: list[Key]
    done: list[bool]  # DoneRule per row


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
            if e.kind != "invalid":
                raise
            target = aside_uri(output_uri, job) + uri[len(data_uri):]
            storage.move(uri, target)
            state.set_aside.append(uri)
            log(f"[resume] {uri} is not a readable Parquet file ({e.reason}); moved it to {target}; "
                "the keys it held are run again")
            continue
        keys = [key(c, p) for c, p in zip(table["clip_id"].to_pylist(), table["prompt"].to_pylist())]
        state.files.append(FileKeys(uri, keys, rule(table).to_pylist()))
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


# --- 3. after the run: compact, replace, repair --------------------------------------------------


def rows_to_drop(files: list[FileKeys], written: set[Key], replace_all: bool) -> dict[str, list[int]]:
    """Row indices to remove per older file: every row when `replace_all` (resume=false), else
    rows whose key this run wrote again, and all but one row of a key duplicated among them (the
    kept one: a done row before an error, then the newest file name, i.e. the latest run_id).

    Example: a.parquet holds k1 (error), k2 (ok); b.parquet holds k2 (ok); this run wrote k1 ->
    {'a.parquet': [0, 1]} (k1 rewritten; k2 kept in b, the newer name).
    """
    drops: dict[str, list[int]] = {}
    best: dict[Key, tuple[tuple[bool, str, int], str, int]] = {}
    for f in files:
        for row, (k, done) in enumerate(zip(f.keys, f.done)):
            if replace_all or k in written:
                drops.setdefault(f.uri, []).append(row)
                continue
            rank = (done, posixpath.basename(f.uri), row)
            if k in best:
                loser = min(best[k], (rank, f.uri, row))
                drops.setdefault(loser[1], []).append(loser[2])
                best[k] = max(best[k], (rank, f.uri, row))
            else:
                best[k] = (rank, f.uri, row)
    return {uri: sorted(rows) for uri, rows in drops.items()}


def consolidate(storage: Storage, writer: PartWriter, state: OutputState, replace_all: bool,
                log: Callable[[str], None] = print) -> list[str]:
    """Compact this run's files, drop the older rows it replaces, merge older small files (those a
    killed run left, one per flush); returns this run's files. Every change writes first."""
    stem = f"{writer.partition_uri}/part-{writer.run_id}"
    files = []
    for suffix, group in _by_kind(writer.files).items():
        with writing(writer.partition_uri):
            files += rewrite(storage, group, {}, f"{stem}-c", suffix) if len(group) > 1 else group
    drops = rows_to_drop(state.files, writer.written, replace_all)
    for n, (group, suffix) in enumerate(older_rewrites(state.files, drops)):
        folder = posixpath.dirname(group[0])
        with writing(folder):
            rewrite(storage, group, drops, f"{folder}/part-{writer.run_id}-r{n:05d}-", suffix)
    if drops:
        log(f"[write] replaced {sum(map(len, drops.values()))} older rows in {len(drops)} files")
    return files


def older_rewrites(files: list[FileKeys], drops: dict[str, list[int]]) -> list[tuple[list[str], str]]:
    """(files, suffix) to rewrite as one: each file losing rows, merged with the other small files
    (< SMALL_FILE_ROWS rows left) of its folder and kind, so killed runs' flushes do not pile up."""
    left = {f.uri: len(f.keys) - len(drops.get(f.uri, [])) for f in files}
    small: dict[tuple[str, str], list[str]] = {}
    for f in files:
        if 0 < left[f.uri] < SMALL_FILE_ROWS:
            small.setdefault((posixpath.dirname(f.uri), _suffix(f.uri)), []).append(f.uri)
    merged = [(group, suffix) for (_, suffix), group in sorted(small.items()) if len(group) > 1]
    in_merge = {uri for group, _ in merged for uri in group}
    return merged + [([uri], _suffix(uri)) for uri in sorted(drops) if uri not in in_merge]


def rewrite(storage: Storage, sources: list[str], drops: dict[str, list[int]], stem: str, suffix: str) -> list[str]:
    """`sources` without their `drops` rows as files `<stem>00000<suffix>`... of up to
    ROWS_PER_FILE rows, written before the sources are deleted; returns the files written."""
    tables = []
    for uri in sources:
        table = storage.read_parquet(uri)
        if drops.get(uri):
            table = table.filter(pc.invert(pc.is_in(pa.array(range(table.num_rows)), pa.array(drops[uri]))))
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    written = []
    for n, start in enumerate(range(0, table.num_rows if table is not None else 0, ROWS_PER_FILE)):
        written.append(f"{stem}{n:05d}{suffix}")
        storage.write_parquet_atomic(table.slice(start, ROWS_PER_FILE), written[-1])
    for uri in sources:
        storage.delete(uri)
    return written


def _suffix(uri: str) -> str:
    return ERRORS_SUFFIX if uri.endswith(ERRORS_SUFFIX) else ".parquet"


def _by_kind(files: list[str]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for uri in files:
        kinds.setdefault(_suffix(uri), []).append(uri)
    return dict(sorted(kinds.items()))
