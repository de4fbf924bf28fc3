"""pipeline._write without Ray: what a run finds, how its rows reach storage, what they replace.

Rows are real FILE_SCHEMA tables written as real Parquet files in a local output folder, and
once in a bucket of the test S3 server.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import _write
from pipeline._consolidate import SMALL_FILE_ROWS, consolidate, older_rewrites, rows_to_drop
from pipeline._write import FileKeys, OutputError, PartWriter, read_state
from pipeline.schema import FILE_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY, schema_version
from pipeline.storage import Storage

JOB = "caption"


def rows(*specs: tuple[str, str]) -> pa.Table:
    """FILE_SCHEMA rows from (clip_id, status); prompt 'p'."""
    return pa.Table.from_pylist([{"clip_id": c, "prompt": "p", "status": s, "video_uri": f"/v/{c}.mp4", "run_id": "r",
                                  "error": None if s != "error" else f"/v/{c}.mp4: broken"} for c, s in specs],
                                schema=FILE_SCHEMA)


def put(out: Path, name: str, table: pa.Table, run_date: str = "2026-11-28") -> str:
    folder = out / "data" / f"job={JOB}" / f"run_date={run_date}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name)
    return str(folder / name)


def all_rows(out: Path) -> list[tuple[str, str]]:
    files = sorted((out / "data").rglob("*.parquet"))
    tables = [pq.read_table(f, columns=["clip_id", "status"]).to_pydict() for f in files]
    return sorted(pair for t in tables for pair in zip(t["clip_id"], t["status"]))


def keys_of(out: Path) -> Counter:
    return Counter(str(c) for c, _ in all_rows(out))


def writer_for(out: Path, run_id: str, done: set, **kwargs) -> PartWriter:
    partition = f"{_write.job_data_uri(str(out), JOB)}/run_date=2026-11-29"
    return PartWriter(Storage(), partition, run_id, set(done), **kwargs)


# --- which rows go ------------------------------------------------------------------------------


def test_rows_to_drop_replaces_rewritten_keys_and_keeps_one_row_of_a_duplicate() -> None:
    a = FileKeys("d/part-r1-00000.parquet", [("k1", "p"), ("k2", "p")], [False, True])
    b = FileKeys("d/part-r2-00000.parquet", [("k2", "p"), ("k3", "p")], [True, True])
    c = FileKeys("d/part-r3-00000-errors.parquet", [("k3", "p")], [False])
    assert rows_to_drop([a, b, c], written={("k1", "p")}, replace_all=False) == {
        "d/part-r1-00000.parquet": [0, 1],  # k1 rewritten; k2 also in b, the newer run
        "d/part-r3-00000-errors.parquet": [0],  # k3 failed later but is done in b: the done row stays
    }
    assert rows_to_drop([a, b, c], written=set(), replace_all=True) == {
        a.uri: [0, 1], b.uri: [0, 1], c.uri: [0]}
    assert rows_to_drop([b], written={("k9", "p")}, replace_all=False) == {}


def test_an_error_of_a_whole_clip_or_video_goes_once_the_clip_is_decoded_or_the_video_probed() -> None:
    older = FileKeys("d/part-r1-00000-errors.parquet",
                     [("c1", ""), ("c2", ""), ("c3", ""), ("v1", ""), ("v2", ""), ("v3", "")],
                     [False, False, False, False, False, True])  # v3: a skipped video (done)
    done = FileKeys("d/part-r0-00000.parquet", [("c2", "p")], [True])  # c2's rows were done already
    drops = rows_to_drop([older, done], written={("c1", "p")}, replace_all=False, probed={("v1", ""), ("v3", "")})
    # c1: decoded by this run; c2: done in the output; v1: probed by this run. c3 and v2: still
    # failing as far as anyone knows; v3: a done row is never dropped by a probe
    assert drops == {older.uri: [0, 1, 3]}


def test_an_output_folder_named_with_glob_characters_is_listed_as_it_is(tmp_path: Path) -> None:
    out = tmp_path / "runs[2026]?"  # a glob would match 'runs2?' or nothing: resume would see no rows
    put(out, "part-r1-00000.parquet", rows(("k1", "ok")))
    state = read_state(Storage(), str(out), JOB)
    assert _write.finished_keys(state) == {("k1", "p")}


def test_older_rewrites_merge_small_files_per_folder_and_kind_and_rewrite_each_file_losing_rows() -> None:
    def keys(n: int) -> list[tuple[str, str]]:
        return [(f"k{i}", "p") for i in range(n)]

    small_a = FileKeys("d1/part-r1-00000.parquet", keys(2), [True] * 2)
    small_b = FileKeys("d1/part-r1-00001.parquet", keys(3), [True] * 3)
    small_errors = FileKeys("d1/part-r1-00001-errors.parquet", keys(1), [False])  # the only small errors file
    alone = FileKeys("d2/part-r1-00000.parquet", keys(2), [True] * 2)  # the only small file of d2: kept as is
    big = FileKeys("d2/part-r2-00000.parquet", keys(SMALL_FILE_ROWS + 5), [True] * (SMALL_FILE_ROWS + 5))
    shrinking = FileKeys("d3/part-r2-00000.parquet", keys(SMALL_FILE_ROWS), [True] * SMALL_FILE_ROWS)
    small_d3 = FileKeys("d3/part-r3-00000.parquet", keys(1), [True])
    gone = FileKeys("d3/part-r4-00000.parquet", keys(1), [True])  # every row dropped: rewritten to nothing
    drops = {big.uri: [0], shrinking.uri: [0], gone.uri: [0]}
    plan = older_rewrites([small_a, small_b, small_errors, alone, big, shrinking, small_d3, gone], drops)
    assert plan == [
        ([small_a.uri, small_b.uri], ".parquet"),  # small neighbours of one folder and kind become one file
        ([shrinking.uri, small_d3.uri], ".parquet"),  # losing a row made it small: merged with d3's other one
        ([big.uri], ".parquet"),  # still large after its drop: rewritten on its own
        ([gone.uri], ".parquet"),
    ]


# --- a run's rows, start to end ------------------------------------------------------------------


def test_a_resumed_run_replaces_error_rows_and_repairs_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    put(out, "part-r1-00000.parquet", rows(("k1", "ok"), ("k2", "ok")))
    put(out, "part-r2-00000.parquet", rows(("k1", "ok"), ("k2", "ok")))  # a concurrent run of an older version
    put(out, "part-r2-00000-errors.parquet", rows(("k3", "error")))
    state = read_state(Storage(), str(out), JOB)
    done = _write.finished_keys(state)
    assert done == {("k1", "p"), ("k2", "p")}

    writer = writer_for(out, "r3", done, flush_rows=1)
    kept = writer.add(rows(("k3", "ok"), ("k1", "ok")))  # k1 again: a retried batch
    writer.add(rows(("k5", "ok")))
    writer.add(rows(("k4", "error")))
    writer.flush()
    assert kept.num_rows == 1 and len(writer.files) == 3  # one file per flush
    files = consolidate(Storage(), writer, state, replace_all=False)

    assert all_rows(out) == [("k1", "ok"), ("k2", "ok"), ("k3", "ok"), ("k4", "error"), ("k5", "ok")]
    assert [Path(f).name for f in files] == ["part-r3-00002-errors.parquet", "part-r3-c00000.parquet"]
    assert not any(Path(f).exists() for f in writer.files[:2])  # the small files were compacted


def test_consolidation_stops_at_the_first_write_once_the_lease_is_lost(tmp_path: Path) -> None:
    """Step 3 writes and deletes under the lease as the flushes do: a run that stalled past its
    ttl and lost the lease must not delete files the new holder has listed."""
    from pipeline.lease import LeaseLost

    out = tmp_path / "out"
    put(out, "part-r1-00000.parquet", rows(("k1", "ok"), ("k2", "error")))
    put(out, "part-r2-00000.parquet", rows(("k3", "ok")))  # two small older files: merged
    state = read_state(Storage(), str(out), JOB)
    lost = [False]

    def check() -> None:
        if lost[0]:
            raise LeaseLost("taken over")

    writer = writer_for(out, "r3", _write.finished_keys(state), flush_rows=1, before_write=check)
    writer.add(rows(("k2", "ok")))
    writer.add(rows(("k4", "ok")))
    writer.flush()
    before = sorted(p.name for p in (out / "data").rglob("*.parquet"))
    lost[0] = True
    with pytest.raises(LeaseLost):
        consolidate(Storage(), writer, state, replace_all=False)
    assert sorted(p.name for p in (out / "data").rglob("*.parquet")) == before  # nothing written or deleted


def test_small_files_a_killed_run_left_are_merged_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for n, key in enumerate(("k1", "k2", "k3")):  # one file per flush, then the kill
        put(out, f"part-r1-0000{n}.parquet", rows((key, "ok")))
    put(out, "part-r1-00000-errors.parquet", rows(("k4", "error")))
    put(out, "part-r1-00001-errors.parquet", rows(("k5", "error")))
    put(out, "part-r0-00000.parquet", rows(("k0", "ok")), run_date="2026-11-27")  # alone in its folder: kept
    state = read_state(Storage(), str(out), JOB)
    writer = writer_for(out, "r2", _write.finished_keys(state))
    writer.add(rows(("k5", "ok")))
    writer.flush()
    consolidate(Storage(), writer, state, replace_all=False)
    assert all_rows(out) == [("k0", "ok"), ("k1", "ok"), ("k2", "ok"), ("k3", "ok"), ("k4", "error"), ("k5", "ok")]
    by_folder = {p.parent.name: sorted(q.name for q in p.parent.glob("*.parquet")) for p in (out / "data").rglob("*.parquet")}
    assert by_folder == {"run_date=2026-11-27": ["part-r0-00000.parquet"],
                         # the three ok files merged; k5's error row replaced, so k4's file is left alone
                         "run_date=2026-11-28": ["part-r1-00000-errors.parquet", "part-r2-r00000-00000.parquet"],
                         "run_date=2026-11-29": ["part-r2-00000.parquet"]}


def test_resume_false_keeps_every_old_row_until_the_new_rows_are_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = put(out, "part-r1-00000.parquet", rows(("k1", "ok"), ("k2", "ok"), ("gone", "ok")))
    state = read_state(Storage(), str(out), JOB)
    writer = writer_for(out, "r2", set(), flush_rows=1)
    writer.add(rows(("k1", "ok")))
    assert Path(old).exists() and keys_of(out)["k2"] == 1  # mid-run: the old rows are all still there
    writer.add(rows(("k2", "error")))
    writer.flush()
    consolidate(Storage(), writer, state, replace_all=True)
    assert all_rows(out) == [("k1", "ok"), ("k2", "error")] and not Path(old).exists()


class CrashAfterWrites(Storage):
    """A real local Storage whose process 'dies' (an exception nobody catches) once it has
    written `writes` files: every step of consolidate is interrupted in turn."""

    def __init__(self, writes: int):
        super().__init__()
        self.writes_left = writes

    def write_parquet_atomic(self, table: pa.Table, uri: str) -> None:
        if self.writes_left == 0:
            raise KeyboardInterrupt("killed")
        self.writes_left -= 1
        super().write_parquet_atomic(table, uri)

    def delete(self, uri: str) -> None:
        if self.writes_left == 0:
            raise KeyboardInterrupt("killed")
        super().delete(uri)


@pytest.mark.parametrize("writes_before_crash", [0, 1, 2, 3, 4])
def test_a_crash_anywhere_in_the_replacement_loses_no_key_and_the_next_run_repairs(
        tmp_path: Path, writes_before_crash: int) -> None:
    out = tmp_path / "out"
    put(out, "part-r1-00000.parquet", rows(("k1", "ok"), ("k2", "ok")))
    put(out, "part-r1-00000-errors.parquet", rows(("k3", "error"), ("k4", "error")))
    state = read_state(Storage(), str(out), JOB)
    writer = writer_for(out, "r2", set())
    writer.storage = CrashAfterWrites(writes_before_crash + 2)  # the run's two flushes always land
    writer.add(rows(("k1", "ok")))
    writer.flush()
    writer.add(rows(("k3", "ok")))
    writer.flush()
    try:
        consolidate(writer.storage, writer, state, replace_all=False)
    except KeyboardInterrupt:
        pass
    assert set(keys_of(out)) == {"k1", "k2", "k3", "k4"}  # every key readable at least once

    # The next run (resume): k1..k3 done, k4 retried; afterwards every key exactly once.
    state = read_state(Storage(), str(out), JOB)
    writer = writer_for(out, "r3", _write.finished_keys(state))
    writer.add(rows(("k1", "ok"), ("k2", "ok"), ("k3", "ok"), ("k4", "ok")))
    writer.flush()
    consolidate(Storage(), writer, state, replace_all=False)
    assert all_rows(out) == [("k1", "ok"), ("k2", "ok"), ("k3", "ok"), ("k4", "ok")]


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_crash_leftovers_are_cleaned_and_unreadable_parts_moved_aside(tmp_path: Path, scheme: str) -> None:
    out = tmp_path / "out"
    good = put(out, "part-r1-00000.parquet", rows(("k1", "ok")))
    folder = Path(good).parent
    data = Path(good).read_bytes()
    (folder / ".part-r2-00000.parquet.5e1f.tmp").write_bytes(b"")  # killed while writing
    (folder / "part-r2-00001.parquet").write_bytes(b"")  # renamed before its bytes reached the disk
    (folder / "part-r2-00002.parquet").write_bytes(data[:-20])  # cut short
    (folder / "part-r2-00003.parquet").write_bytes(data[:-30] + b"\xff" * 22 + data[-8:])  # torn footer
    logged: list[str] = []
    state = read_state(Storage(), f"{scheme}{out}", JOB, log=logged.append)
    assert [f.uri for f in state.files] == [good]
    assert _write.finished_keys(state) == {("k1", "p")}
    assert not (folder / ".part-r2-00000.parquet.5e1f.tmp").exists()
    aside = out / "unreadable" / f"job={JOB}" / "run_date=2026-11-28"  # also with file:// output
    assert sorted(p.name for p in aside.iterdir()) == [f"part-r2-0000{n}.parquet" for n in (1, 2, 3)]
    assert any(".part-r2-00000.parquet.5e1f.tmp" in line for line in logged)
    assert sum(f"{folder}/part-r2-0000{n}.parquet is not a readable Parquet file" in " ".join(logged)
               for n in (1, 2, 3)) == 3


def test_a_file_that_cannot_be_read_stops_the_resume_and_stays(tmp_path: Path, monkeypatch) -> None:
    """An I/O error (or an S3 answer) says nothing about a file's bytes: setting it aside would
    take finished rows out of data/ and run their keys again."""
    import errno

    from pipeline.storage_errors import StorageError, translated

    out = tmp_path / "out"
    good = put(out, "part-r1-00000.parquet", rows(("k1", "ok")))
    storage = Storage()

    def failing_read(uri, *args, **kwargs):
        with translated(uri):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(storage, "_read_parquet_file", failing_read)
    with pytest.raises(StorageError, match="part-r1-00000.parquet.*Input/output error"):
        read_state(storage, str(out), JOB, log=print)
    assert Path(good).exists() and not (out / "unreadable").exists()


# --- flushing ------------------------------------------------------------------------------------


def test_rows_reach_storage_within_flush_interval_without_another_block(tmp_path: Path) -> None:
    writer = writer_for(tmp_path / "out", "r1", set(), flush_interval_s=0.5, flush_rows=1000)
    with _write.FlushTimer(writer, period_s=0.1):
        writer.add(rows(("k1", "ok")))
        assert not writer.files
        time.sleep(1.5)
        assert len(writer.files) == 1 and pq.read_table(writer.files[0]).num_rows == 1


def test_flush_rows_bounds_what_waits_in_memory(tmp_path: Path) -> None:
    writer = writer_for(tmp_path / "out", "r1", set(), flush_interval_s=3600, flush_rows=2)
    writer.add(rows(("k1", "ok")))
    assert not writer.files
    writer.add(rows(("k2", "ok")))
    assert len(writer.files) == 1


def test_error_text_is_redacted_before_it_is_written(tmp_path: Path) -> None:
    writer = writer_for(tmp_path / "out", "r1", set())
    table = rows(("k1", "error"))
    leaky = "s3://b/k.mp4: Could not connect to the endpoint URL: http://ana:pw-secret-1@minio:9000/b/k.mp4"
    writer.add(table.set_column(table.schema.get_field_index("error"), "error", pa.array([leaky])))
    writer.flush()
    [error] = pq.read_table(writer.files[0])["error"].to_pylist()
    assert "pw-secret-1" not in error and "http://***@minio:9000/b/k.mp4" in error


def test_an_unwritable_output_is_an_output_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file where the output folder should be")
    writer = writer_for(tmp_path / "out", "r1", set())
    writer.add(rows(("k1", "ok")))
    with pytest.raises(OutputError, match=r"output.uri: cannot write .*/out/data/job=caption/run_date=2026-11-29"):
        writer.flush()


def test_replacement_compaction_and_set_aside_on_s3(s3_server: str, s3_bucket: str) -> None:
    """The same life on HTTP S3: no rename there, so moving aside is copy + delete, and every
    file is one PUT."""
    from pipeline.config import StorageConfig

    storage = Storage(StorageConfig(endpoint_url=s3_server))
    out = f"s3://{s3_bucket}/out"
    folder = f"{_write.job_data_uri(out, JOB)}/run_date=2026-11-28"
    storage.write_parquet_atomic(rows(("k1", "ok"), ("k2", "ok")), f"{folder}/part-r1-00000.parquet")
    storage.write_parquet_atomic(rows(("k1", "ok")), f"{folder}/part-r2-00000.parquet")  # k1 twice
    storage.write_parquet_atomic(rows(("k3", "error")), f"{folder}/part-r2-00000-errors.parquet")
    storage.write_bytes_atomic(f"{folder}/part-r2-00001.parquet", b"")  # a 0-byte part
    logged: list[str] = []
    state = read_state(storage, out, JOB, log=logged.append)
    assert storage.exists(f"{_write.aside_uri(out, JOB)}/run_date=2026-11-28/part-r2-00001.parquet")
    assert any("part-r2-00001.parquet is not a readable Parquet file" in line for line in logged)

    writer = PartWriter(storage, f"{_write.job_data_uri(out, JOB)}/run_date=2026-11-29", "r3",
                        _write.finished_keys(state), flush_rows=1)
    writer.add(rows(("k3", "ok")))
    writer.add(rows(("k4", "ok")))
    writer.flush()
    files = consolidate(storage, writer, state, replace_all=False)
    table = storage.read_parquet(_write.job_data_uri(out, JOB), columns=["clip_id", "status"]).to_pydict()
    assert sorted(zip(table["clip_id"], table["status"])) == [("k1", "ok"), ("k2", "ok"), ("k3", "ok"), ("k4", "ok")]
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-r3-c00000.parquet"]


@dataclass(frozen=True)
class EngineBOnly(_write.DoneRule):
    """A provenance rule of the kind issue 8 plugs in: ok rows count only from engine 'B'."""

    columns: tuple[str, ...] = ("status", "engine")

    def __call__(self, table: pa.Table) -> pa.ChunkedArray:
        return pc.fill_null(pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["engine"], "B")), False)


def test_a_done_rule_with_a_new_column_reads_older_files_as_null_and_their_keys_are_redone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    put(out, "part-r1-00000.parquet", rows(("k1", "ok")))  # written before the column existed
    with_b = rows(("k2", "ok"))
    put(out, "part-r2-00000.parquet", with_b.append_column("engine", pa.array(["B"])))
    logged: list[str] = []
    state = read_state(Storage(), str(out), JOB, log=logged.append, rule=EngineBOnly())
    assert len(state.files) == 2 and not state.set_aside and not logged  # an old file is not "unreadable"
    assert _write.finished_keys(state) == {("k2", "p")}
    writer = writer_for(out, "r3", _write.finished_keys(state))
    writer.add(rows(("k1", "ok")))
    writer.flush()
    consolidate(Storage(), writer, state, replace_all=False)
    assert all_rows(out) == [("k1", "ok"), ("k2", "ok")]
    assert not (out / "data" / f"job={JOB}" / "run_date=2026-11-28" / "part-r1-00000.parquet").exists()


def test_files_of_an_older_schema_version_are_upgraded_so_every_engine_reads_the_output(tmp_path: Path) -> None:
    """A version-2 file (before the video_prefill columns) beside this run's: the run ends with
    one schema in the folder, which Polars needs; the old file's rows are unchanged."""
    import duckdb
    import polars as pl

    out = tmp_path / "out"
    new_columns = {"video_prefill_shared", "video_prefill_unshared_reason"}
    version_2 = pa.schema([f for f in FILE_SCHEMA if f.name not in new_columns],
                          metadata={SCHEMA_VERSION_KEY: b"2"})
    old_rows = rows(("k1", "ok"), ("k2", "error")).select(version_2.names).cast(version_2)
    kept = put(out, "part-r1-00000.parquet", old_rows, run_date="2026-11-29")  # no row of it replaced
    pl_glob = f"{out}/data/*/*/*.parquet"
    probe = put(out, "probe.parquet", rows(("k9", "ok")), run_date="2026-11-29")
    with pytest.raises(pl.exceptions.PolarsError):  # what a mixed folder does to a reader
        pl.scan_parquet(pl_glob, hive_partitioning=True).collect()
    Path(probe).unlink()

    logged: list[str] = []
    state = read_state(Storage(), str(out), JOB)
    assert [f.schema_version for f in state.files] == [2]
    writer = writer_for(out, "r2", _write.finished_keys(state))
    writer.add(rows(("k3", "ok")).set_column(FILE_SCHEMA.get_field_index("video_prefill_shared"),
                                             "video_prefill_shared", pa.array([True])))
    writer.flush()
    consolidate(Storage(), writer, state, replace_all=False, log=logged.append)

    assert pq.read_schema(kept).remove_metadata().equals(FILE_SCHEMA.remove_metadata())
    assert schema_version(pq.read_schema(kept)) == SCHEMA_VERSION
    assert pq.read_table(kept).select(version_2.names).to_pylist() == old_rows.to_pylist()
    assert logged == [f"[write] upgraded 1 files of schema version [2] to version {SCHEMA_VERSION}"]
    frame = pl.scan_parquet(pl_glob, hive_partitioning=True).select("clip_id", "video_prefill_shared").collect()
    assert sorted(frame.rows()) == [("k1", None), ("k2", None), ("k3", True)]
    assert duckdb.sql(f"SELECT count(video_prefill_shared) FROM read_parquet('{pl_glob}')").fetchall() == [(1,)]
