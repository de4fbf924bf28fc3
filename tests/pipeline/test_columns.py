"""Honest columns, without Ray: skipped rows say why in their own column, per-call timings get
per-row shares that add up, peak memory is named after what was measured, and a summary row has
the declared types whether or not the run measured anything."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline._output import call_shares, to_output_table
from pipeline._shard import skipped_row
from pipeline._summary import RunStats, build_summary, summary_table
from pipeline.config import JobConfig
from pipeline.schema import FILE_SCHEMA, SCHEMA_VERSION, SUMMARY_FILE_SCHEMA, schema_version


def test_a_skipped_row_says_why_in_skip_reason_not_error() -> None:
    row = skipped_row({"video_uri": "/v/still.mp4", "duration_s": 0.0, "status": "ok"}, JobConfig().clips, "s")
    assert row["status"] == "skipped" and "error" not in row and "error_stage" not in row
    assert row["skip_reason"].startswith("/v/still.mp4: the container opens but reports a duration of 0 s")


def test_call_shares_follow_the_docstring_example_and_add_up() -> None:
    shares = call_shares(["a", "a", None], [100.0, 100.0, None], [400.0, 400.0, None], [30.0, 10.0, None])
    assert shares == {"prefill_ms_share": [75.0, 25.0, None], "generate_ms_share": [225.0, 175.0, None]}
    equal = call_shares(["b", "b"], [10.0, 10.0], [30.0, 30.0], [0.0, 0.0])  # no FLOPs known: equal parts
    assert equal == {"prefill_ms_share": [5.0, 5.0], "generate_ms_share": [15.0, 15.0]}


@pytest.mark.parametrize("on_gpu, measured", [(False, "peak_host_rss_bytes"), (True, "peak_device_memory_bytes")])
def test_peak_memory_goes_to_the_column_of_what_was_measured(on_gpu: bool, measured: str) -> None:
    columns = {"video_uri": ["/v/a.mp4"], "clip_id": ["c"], "prompt": ["p"], "status": ["ok"], "peak_memory_bytes": [123],
               "batch_id": ["b"], "prefill_ms": [1.0], "generate_ms": [2.0], "flops_dropped": [5.0]}
    table = to_output_table(columns, "run", on_gpu=on_gpu)
    other = ({"peak_host_rss_bytes", "peak_device_memory_bytes"} - {measured}).pop()
    assert table[measured].to_pylist() == [123] and table[other].to_pylist() == [None]
    assert table["finished_at"].to_pylist()[0] is not None and table["started_at"].to_pylist() == [None]
    assert table.schema.equals(FILE_SCHEMA) and schema_version(table.schema) == SCHEMA_VERSION


def test_a_summary_row_has_the_declared_types_even_with_nothing_measured() -> None:
    cfg = JobConfig()
    start = dt.datetime(2026, 11, 30, 1, 2, 3, tzinfo=dt.UTC)
    empty = build_summary(RunStats(), cfg, run_id="r", started_at=start, finished_at=start + dt.timedelta(seconds=3),
                          planned_rows=0, resumed_keys=4, cluster_cpus=2, cluster_gpus=0, files=[], config_yaml="x: 1",
                          engine_fingerprint="f")
    table = summary_table(empty)
    assert table.schema.equals(SUMMARY_FILE_SCHEMA) and table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["video_seconds_processed"] == 0.0 and row["retention_achieved_mean"] is None
    assert row["errors_by_stage"] == [] and row["quality"]["verdict"] == "not measured"
    assert empty["run_date"] == "2026-11-30" and "job" not in table.column_names and "run_date" not in table.column_names
    assert table.schema.field("video_seconds_processed").type == pa.float64()  # not int64 when it is 0


def test_the_driver_and_the_test_stand_ins_never_import_torch_or_transformers() -> None:
    """The driver plans, writes and summarises; only the model actors load a model. Importing the
    model stack costs about 8 s on 2 cores: in the driver of every run, and in every Ray actor of
    a stand-in stage (an actor imports its class's module), or of the driver's plan-row task.
    What the driver computes from the model settings (the engine fingerprint, the software
    versions of its summary, the node cache) is computed here too."""
    code = ("import sys, pipeline.__main__, pipeline.run, pipeline.plan, pipeline._output, workers.rows, "
            "tests.pipeline.stand_ins\n"
            "from pipeline.config import load_job\n"
            "from pipeline.run import _io_kwargs, run_fingerprint\n"
            "from pipeline.storage import Storage\n"
            "from workers.provenance import software_versions\n"
            "cfg = load_job('jobs/caption.yaml', ['preset=offline'])\n"
            "print(run_fingerprint(cfg), software_versions()['torch_version'], _io_kwargs(cfg, Storage())['cache_dir'])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    computed, imported = out.stdout.strip().splitlines()
    assert imported == "[]"
    fingerprint, torch_version, _ = computed.split()
    from pipeline.config import load_job
    from pipeline.run import run_fingerprint

    assert fingerprint == run_fingerprint(load_job(root / "jobs" / "caption.yaml", ["preset=offline"]))  # as with torch
    assert torch_version == importlib.metadata.version("torch")
