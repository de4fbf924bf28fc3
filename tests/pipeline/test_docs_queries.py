"""The output as a data product: every query in docs/schema.md and docs/cluster.md runs as written
(DuckDB, Polars, pyarrow, pandas) against real outputs of the real tiny model, one with errors and
one without; the declared schemas hold in every engine, empty runs included.

Two outputs, made once: `mixed` (two readable videos, an empty file: a probe error; every clip
shadowed so the shadow query has rows) and `clean` (one readable video, run twice: the second run
has nothing left to do and writes an empty summary).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.run import run
from pipeline.schema import FILE_SCHEMA, PARTITIONING_SCHEMA, SCHEMA_VERSION, SUMMARY_FILE_SCHEMA, schema_version
from tests.pipeline.runs import REPO, offline

DOCS = {name: (REPO / "docs" / name).read_text() for name in ("schema.md", "cluster.md")}
DOC_PREFIXES = ("s3://example-captions/v2drop/", "outputs/")
pytestmark = pytest.mark.slow


def job(out: Path, videos: Path, *overrides: str):
    return offline("caption.yaml", out, f"input.uri={videos}", *overrides)


@pytest.fixture(scope="module")
def outputs(ray_cluster: None, shared_videos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    mixed_in, clean_in = tmp_path_factory.mktemp("mixed-in"), tmp_path_factory.mktemp("clean-in")
    for name in ("nasa_13013.mp4", "h265_video.mp4"):
        (mixed_in / name).symlink_to(shared_videos / name)
    (mixed_in / "zero.mp4").write_bytes(b"")
    (clean_in / "h265_video.mp4").symlink_to(shared_videos / "h265_video.mp4")
    mixed, clean = tmp_path_factory.mktemp("mixed"), tmp_path_factory.mktemp("clean")
    summaries = {"mixed": run(job(mixed, mixed_in, "quality.shadow_fraction=1.0"))}
    summaries["clean"] = run(job(clean, clean_in))
    summaries["empty"] = run(job(clean, clean_in))
    assert summaries["mixed"]["rows_error"] == 1 and summaries["clean"]["rows_error"] == 0
    assert summaries["empty"]["planned_rows"] == 0 and summaries["empty"]["rows_ok"] == 0
    return {"mixed": mixed, "clean": clean}


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def localized(code: str, out: Path) -> str:
    for prefix in DOC_PREFIXES:
        code = code.replace(prefix, f"{out}/")
    return code


def sql_statements(doc: str) -> list[str]:
    statements = [s.strip() for block in code_blocks(DOCS[doc], "sql") for s in block.split(";")]
    return [s for s in statements if re.sub(r"--.*", "", s).strip()]


@pytest.mark.parametrize("which", ["mixed", "clean"])
@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_documented_duckdb_query_runs(outputs: dict[str, Path], doc: str, which: str) -> None:
    statements = sql_statements(doc)
    assert len(statements) >= (10 if doc == "schema.md" else 2)
    results = {s: duckdb.sql(localized(s, outputs[which])).fetchall() for s in statements}
    assert next(iter(results.values()))  # the first query of each doc reads real rows, not an empty glob
    errors = next((r for s, r in results.items() if "status = 'error'" in s), None)
    if errors is not None:
        assert errors == ([] if which == "clean" else [("probe", 1, errors[0][2])])
    runs = next((r for s, r in results.items() if "summaries" in s and "rows_ok" in s), None)
    assert runs is None or len(runs) == (1 if which == "mixed" else 2)


@pytest.mark.parametrize("which", ["mixed", "clean"])
@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_documented_python_example_runs(outputs: dict[str, Path], doc: str, which: str) -> None:
    blocks = code_blocks(DOCS[doc], "python")
    assert blocks
    for block in blocks:
        scope: dict = {}
        exec(compile(localized(block, outputs[which]), f"{doc} example", "exec"), scope)  # noqa: S102 - our own docs
        if "partitioning" in scope:  # the documented partitioning is the project's
            assert [(f.name, f.type) for f in scope["partitioning"].schema] == [(f.name, f.type) for f in PARTITIONING_SCHEMA]
        for name in ("rows", "table", "t", "summaries", "errors", "per_day"):
            value = scope.get(name)
            if value is None or isinstance(value, ds.Dataset):
                continue
            if isinstance(value, pl.LazyFrame):
                value = value.collect()
            if name == "errors":
                assert len(value) == (0 if which == "clean" else 1)
            else:
                assert len(value) > 0, (doc, name)


def test_the_pyarrow_example_needs_only_pyarrow() -> None:
    [example] = [b for b in code_blocks(DOCS["schema.md"], "python") if "import pyarrow.dataset" in b and "pandas" not in b]
    assert set(re.findall(r"^(?:import|from) (\w+)", example, flags=re.M)) == {"pyarrow"}


def run_date_types(out: Path) -> dict[str, object]:
    partitioning = ds.partitioning(PARTITIONING_SCHEMA, flavor="hive")
    glob = f"{out}/data/*/*/*.parquet"
    return {
        "duckdb": duckdb.sql(f"SELECT typeof(run_date) FROM read_parquet('{glob}', hive_partitioning = true) LIMIT 1").fetchall()[0][0],
        "polars": pl.scan_parquet(f"{out}/data/**/*.parquet", hive_partitioning=True).collect_schema()["run_date"],
        "pyarrow": ds.dataset(f"{out}/data", partitioning=partitioning).schema.field("run_date").type,
        "pandas": type(pd.read_parquet(f"{out}/data", partitioning=partitioning)["run_date"].iloc[0]),
    }


def test_run_date_is_a_date_in_every_reader(outputs: dict[str, Path]) -> None:
    assert run_date_types(outputs["mixed"]) == {"duckdb": "DATE", "polars": pl.Date, "pyarrow": pa.date32(),
                                                "pandas": dt.date}
    today = dt.datetime.now(dt.UTC).date()
    rows = pl.scan_parquet(f"{outputs['mixed']}/data/**/*.parquet", hive_partitioning=True)
    assert rows.filter(pl.col("run_date") == today).select(pl.len()).collect().item() > 0


def test_every_file_has_the_declared_schema_and_version(outputs: dict[str, Path]) -> None:
    for out in outputs.values():
        data = sorted((out / "data").rglob("*.parquet"))
        summaries = sorted((out / "summaries").rglob("*.parquet"))
        assert data and summaries and not [p for p in (out / "summaries").rglob("*") if p.is_file() and p.suffix != ".parquet"]
        for path in data:
            schema = pq.read_schema(path)
            assert schema.remove_metadata().equals(FILE_SCHEMA.remove_metadata()) and schema_version(schema) == SCHEMA_VERSION
        for path in summaries:
            schema = pq.read_schema(path)
            assert schema.remove_metadata().equals(SUMMARY_FILE_SCHEMA.remove_metadata()), path
            assert schema_version(schema) == SCHEMA_VERSION
            assert not set(schema.names) & {"job", "run_date"}  # no column repeats a partition key


def test_summaries_of_every_run_read_together_in_every_engine(outputs: dict[str, Path]) -> None:
    """Three runs, one of them empty (0 ok rows: nothing to measure), read as one table."""
    tables = [ds.dataset(f"{out}/summaries", partitioning=ds.partitioning(PARTITIONING_SCHEMA, flavor="hive")).to_table()
              for out in outputs.values()]
    together = pa.concat_tables(tables)
    assert together.num_rows == 3 and together.schema.remove_metadata().equals(
        pa.schema([*SUMMARY_FILE_SCHEMA, *PARTITIONING_SCHEMA]).remove_metadata())
    both = [f"{out}/summaries/*/*/*.parquet" for out in outputs.values()]
    duck = duckdb.sql(f"SELECT rows_ok, video_seconds_processed, typeof(run_date) FROM read_parquet({both!r}, "
                      "hive_partitioning = true) ORDER BY started_at").fetchall()
    assert [r[0] for r in duck] == together.sort_by("started_at")["rows_ok"].to_pylist() and duck[0][2] == "DATE"
    polars = pl.concat([pl.read_parquet(f"{out}/summaries/**/*.parquet", hive_partitioning=True) for out in outputs.values()])
    assert polars.height == 3 and polars.schema["video_seconds_processed"] == pl.Float64


def test_rows_say_per_call_and_per_row_apart(outputs: dict[str, Path]) -> None:
    rows = ds.dataset(f"{outputs['mixed']}/data", partitioning=ds.partitioning(PARTITIONING_SCHEMA, flavor="hive")).to_table()
    ok = [r for r in rows.to_pylist() if r["status"] == "ok"]
    calls: dict[str, list[dict]] = {}
    for r in ok:
        calls.setdefault(r["batch_id"], []).append(r)
    for members in calls.values():
        assert sum(r["generate_ms_share"] for r in members) == pytest.approx(members[0]["generate_ms"])
        assert sum(r["prefill_ms_share"] for r in members) == pytest.approx(members[0]["prefill_ms"])
    assert all(r["peak_host_rss_bytes"] > 0 and r["peak_device_memory_bytes"] is None for r in ok)  # a CPU run
    assert all(len(r["visual_tokens_per_stage"]) == len(r["drop_layers"]) + 1 for r in ok)
    [probe_error] = [r for r in rows.to_pylist() if r["status"] == "error"]
    model_columns = ("model_id", "engine_fingerprint", "batch_id", "started_at", "generate_ms", "worker_host")
    assert all(probe_error[c] is None for c in model_columns) and probe_error["finished_at"] is not None
    assert probe_error["skip_reason"] is None and probe_error["error_stage"] == "probe"


# --- the run report ---------------------------------------------------------------------------


def report_of(out: Path) -> tuple[str, dict[str, bytes]]:
    import base64

    [report] = sorted((out / "runs" / "job=caption").glob("*/report.html"))[:1]
    text = report.read_text()
    images = {name: base64.b64decode(data) for name, data in re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([^"]+)"', text)}
    return text, images


def test_the_run_report_has_every_part(outputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    from pipeline.report import PERCENTILES, SECTIONS

    text, images = report_of(outputs["mixed"])
    assert [s for s in re.findall(r'<h2 id="(\w+)">', text)] == list(SECTIONS)
    # plots where the run has data; a CPU run has no cost plot, only the table saying so
    assert set(images) == {"throughput", "latency", "tokens", "retention", "errors"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000 for png in images.values())
    saved = Path(os.environ.get("V2DROP_REPORT_PNG_DIR") or tmp_path_factory.mktemp("report-png"))  # to look at them
    for name, png in images.items():
        (saved / f"{name}.png").write_bytes(png)
    rows = ds.dataset(f"{outputs['mixed']}/data", partitioning=ds.partitioning(PARTITIONING_SCHEMA, flavor="hive")).to_table()
    calls = {r["batch_id"]: r["generate_ms"] for r in rows.to_pylist() if r["batch_id"]}
    import numpy as np

    for p in PERCENTILES:  # per model call, not per row
        assert f"<th>generate p{p} (ms)</th><td>{np.percentile(list(calls.values()), p):.1f}</td>" in text
    assert f"<th>generate samples</th><td>{len(calls)} model calls</td>" in text
    assert "<th>probe: file is empty (N bytes)</th><td>1</td>" in text  # errors by stage and reason, file name left out
    assert "CPU run: no GPU-hours, no cost" in text and "video-hours per CPU-hour" in text
    [drop_layers] = {tuple(r["drop_layers"]) for r in rows.to_pylist() if r["status"] == "ok"}
    assert f"drop layers {list(drop_layers)}" in text


def test_a_run_with_nothing_to_do_still_gets_a_report(outputs: dict[str, Path]) -> None:
    reports = sorted((outputs["clean"] / "runs" / "job=caption").glob("*/report.html"))
    assert len(reports) == 2
    empty = min(reports, key=lambda p: len(p.read_text()))
    assert "no clips finished" in empty.read_text() and "none: every row is ok" in empty.read_text()


@pytest.fixture(scope="module")
def spark():
    """A local Spark (PySpark from the dev extra, on the machine's Java), 1 core, no UI."""
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[1]").appName("v2drop-docs")
               .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .getOrCreate())
    yield session
    session.stop()


def test_spark_reads_rows_errors_and_every_summary_with_no_workaround(outputs: dict[str, Path], spark) -> None:
    """As docs/schema.md says: spark.read.parquet on the folders, with and without mergeSchema."""
    from pyspark.sql.types import DateType, DoubleType

    mixed, clean = outputs["mixed"], outputs["clean"]
    for merge in ("false", "true"):
        rows = spark.read.option("mergeSchema", merge).parquet(f"{mixed}/data")
        assert isinstance(rows.schema["run_date"].dataType, DateType)
        assert rows.filter("status = 'error'").count() == 1
        assert rows.filter("status = 'ok'").count() > 0
        runs = spark.read.option("mergeSchema", merge).parquet(f"{clean}/summaries")  # two runs, one with 0 ok rows
        assert runs.count() == 2 and runs.filter("rows_ok = 0").count() == 1
        summaries = runs.unionByName(spark.read.option("mergeSchema", merge).parquet(f"{mixed}/summaries"))  # another output
        assert summaries.count() == 3
        assert isinstance(summaries.schema["video_seconds_processed"].dataType, DoubleType)
        assert isinstance(summaries.schema["run_date"].dataType, DateType)
