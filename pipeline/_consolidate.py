"""Stage 6, write (driver), after the run: compact this run's files, replace older rows, repair.

Step 3 of the life of a run's rows (steps 1-2 are in `pipeline._write`). After every row of the
run is written: this run's small files are compacted into files of up to ROWS_PER_FILE rows, then
every older row whose key this run wrote again (an earlier error, `resume=false`, a row the
`DoneRule` refuses) is removed, and so is an earlier error of a whole clip or video that has
since been decoded or probed (`rows_to_drop`), keys that older versions left duplicated keep one row, and older
small files of one folder (a killed run's flushes) are merged, and files of an older schema
version are rewritten with the current one (`FILE_SCHEMA`: one output never mixes schemas, which
Polars refuses). A file is rewritten by writing its replacement first and deleting it second, so a
crash at any point leaves every key readable at least once, and the next run's step 3 leaves it
exactly once. Every write and delete first calls the writer's `before_write` (the run's
`Lease.check`), as its flushes do: a run that lost its lease stops here too.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import pyarrow as pa
import pyarrow.compute as pc

from pipeline._write import ERRORS_SUFFIX, FileKeys, Key, OutputState, PartWriter, writing
from pipeline.schema import FILE_SCHEMA, SCHEMA_VERSION, conform
from pipeline.storage import Storage

ROWS_PER_FILE = 20_000  # compacted files hold up to this many rows: large enough for readers
SMALL_FILE_ROWS = ROWS_PER_FILE // 4  # older files below this are merged with their neighbours


def rows_to_drop(files: list[FileKeys], written: set[Key], replace_all: bool,
                 probed: AbstractSet[Key] = frozenset()) -> dict[str, list[int]]:
    """Row indices to remove per older file: every row when `replace_all` (resume=false), else
    rows whose key this run wrote again, the errors that `settled_errors` finds stale, and all
    but one row of a key duplicated among them (the kept one: a done row before an error, then
    the newest file name, i.e. the latest run_id). `probed`: the video-level keys of every video
    this run probed (one that failed again has its new error row in `written`).

    Example: a.parquet holds k1 (error), k2 (ok); b.parquet holds k2 (ok); this run wrote k1 ->
    {'a.parquet': [0, 1]} (k1 rewritten; k2 kept in b, the newer name).
    """
    drops: dict[str, list[int]] = {}
    best: dict[Key, tuple[tuple[bool, str, int], str, int]] = {}
    settled = settled_errors(files, written, probed)
    for f in files:
        for row, (k, done) in enumerate(zip(f.keys, f.done)):
            if replace_all or k in written or (not done and k in settled):
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


def settled_errors(files: list[FileKeys], written: set[Key], probed: AbstractSet[Key]) -> set[Key]:
    """The clip- and video-level keys (prompt '') whose error rows are stale though no row of
    theirs was written again: a video this run probed (`probed`), and a clip that has a prompt's
    row written by this run or done in the output (its frames were decoded since, or under the
    configuration the output is now judged by). A clip-level error is a probe or decode error,
    the only rows without a prompt besides `skipped` ones, which are done and never dropped so.

    Example: an earlier run's decode of clip c timed out, (c, '') error; this run wrote (c, 'p')
    -> {(c, '')}.
    """
    decoded = {clip for clip, prompt in written if prompt}
    decoded |= {clip for f in files for (clip, prompt), done in zip(f.keys, f.done) if prompt and done}
    return {(clip, "") for clip in decoded} | set(probed)


def consolidate(storage: Storage, writer: PartWriter, state: OutputState, replace_all: bool,
                log: Callable[[str], None] = print, probed: AbstractSet[Key] = frozenset()) -> list[str]:
    """Compact this run's files, drop the older rows it replaces, merge older small files (those a
    killed run left, one per flush); returns this run's files. Every change writes first.
    `probed`: the video-level keys of every video this run probed (rows_to_drop)."""
    stem = f"{writer.partition_uri}/part-{writer.run_id}"
    files = []
    for suffix, group in _by_kind(writer.files).items():
        with writing(writer.partition_uri):
            files += rewrite(storage, group, {}, f"{stem}-c", suffix, writer.before_write) if len(group) > 1 else group
    drops = rows_to_drop(state.files, writer.written, replace_all, probed)
    rewrites = older_rewrites(state.files, drops)
    for n, (group, suffix) in enumerate(rewrites):
        folder = posixpath.dirname(group[0])
        with writing(folder):
            rewrite(storage, group, drops, f"{folder}/part-{writer.run_id}-r{n:05d}-", suffix, writer.before_write)
    if drops:
        log(f"[write] replaced {sum(map(len, drops.values()))} older rows in {len(drops)} files")
    upgrade_older_schemas(storage, state.files, {uri for group, _ in rewrites for uri in group}, log,
                          writer.before_write)
    return files


def upgrade_older_schemas(storage: Storage, files: list[FileKeys], rewritten: set[str],
                          log: Callable[[str], None], before_write: Callable[[], None] = lambda: None) -> None:
    """Rewrite in place, with the current schema, each file of an older version that `rewrite`
    did not already replace (a file is replaced whole, so a crash leaves the old or the new one)."""
    older = [f for f in files if f.uri not in rewritten and f.schema_version < SCHEMA_VERSION]
    for f in older:
        with writing(f.uri):
            table = conform(storage.read_parquet(f.uri), FILE_SCHEMA)
            before_write()
            storage.write_parquet_atomic(table, f.uri)
    if older:
        versions = sorted({f.schema_version for f in older})
        log(f"[write] upgraded {len(older)} files of schema version {versions} to version {SCHEMA_VERSION}")


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


def rewrite(storage: Storage, sources: list[str], drops: dict[str, list[int]], stem: str, suffix: str,
            before_write: Callable[[], None] = lambda: None) -> list[str]:
    """`sources` without their `drops` rows as files `<stem>00000<suffix>`... of up to
    ROWS_PER_FILE rows, written before the sources are deleted; returns the files written."""
    tables = []
    for uri in sources:
        table = storage.read_parquet(uri)
        if drops.get(uri):
            table = table.filter(pc.invert(pc.is_in(pa.array(range(table.num_rows)), pa.array(drops[uri]))))
        tables.append(conform(table, FILE_SCHEMA))  # an older version's file leaves with the current schema
    table = pa.concat_tables(tables) if tables else None
    written = []
    for n, start in enumerate(range(0, table.num_rows if table is not None else 0, ROWS_PER_FILE)):
        written.append(f"{stem}{n:05d}{suffix}")
        before_write()
        storage.write_parquet_atomic(table.slice(start, ROWS_PER_FILE), written[-1])
    for uri in sources:
        before_write()
        storage.delete(uri)
    return written


def _suffix(uri: str) -> str:
    return ERRORS_SUFFIX if uri.endswith(ERRORS_SUFFIX) else ".parquet"


def _by_kind(files: list[str]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for uri in files:
        kinds.setdefault(_suffix(uri), []).append(uri)
    return dict(sorted(kinds.items()))
