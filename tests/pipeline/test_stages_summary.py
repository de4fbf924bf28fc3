"""Stage 7, summary, on its own: `RunStats.update` over written rows, `build_summary`'s arithmetic,
the GPU and CPU efficiency figures, and the printed table; real Arrow tables of the output schema."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from pipeline._summary import CPU_RUN, RunStats, build_summary, efficiency, format_summary
from pipeline.config import JobConfig
from pipeline.schema import FILE_SCHEMA, conform

START = dt.datetime(2026, 11, 30, 1, 0, 0, tzinfo=dt.UTC)


def _rows():
    """Two ok clips (the second partial: its frames stop at 12.5 s), a decode error, a skipped video;
    both ok rows came from one retried call."""
    ok = dict(status="ok", prompt="p", model_id="m", model_revision="r", model_random_weights=True,
              retention_asked=0.25, flops_full=100.0, engine_fingerprint="f", model_dtype="float32",
              attn_implementation="sdpa", self_check="passed", fallback_reason="oom", fallback_batch_id="call-1",
              output_text="a caption", video_uri="/v/a.mp4")
    rows = [
        {**ok, "clip_id": "c1", "clip_index": 0, "start_s": 0.0, "end_s": 10.0, "output_tokens": 10,
         "prompt_tokens": 100, "retention_achieved": 0.2, "flops_dropped": 25.0},
        {**ok, "clip_id": "c2", "clip_index": 1, "start_s": 10.0, "end_s": 20.0, "last_frame_s": 12.5,
         "partial_reason": "/v/a.mp4: cut short", "output_tokens": 6, "prompt_tokens": 90,
         "retention_achieved": 0.4, "flops_dropped": 35.0},
        {"status": "error", "error_stage": "decode", "error": "/v/b.mp4: broken", "clip_id": "c3", "prompt": "p",
         "video_uri": "/v/b.mp4"},
        {"status": "skipped", "clip_id": "c4", "video_uri": "/v/c.mp4", "start_s": 0.0, "end_s": 0.0},
    ]
    return conform({name: [row.get(name) for row in rows] for name in FILE_SCHEMA.names})


def _summary(cfg: JobConfig, stats: RunStats, wall_s: float, cluster_gpus: float = 2) -> dict:
    return build_summary(stats, cfg, run_id="r1", started_at=START, finished_at=START + dt.timedelta(seconds=wall_s),
                         planned_rows=4, resumed_keys=3, cluster_cpus=2, cluster_gpus=cluster_gpus, files=["a", "b"],
                         config_yaml="job: caption", engine_fingerprint="f")


def test_run_stats_count_rows_clips_and_the_seconds_the_model_saw() -> None:
    stats = RunStats()
    stats.update(_rows())
    assert stats.rows_by_status == {"ok": 2, "error": 1, "skipped": 1}
    assert stats.errors_by_stage == {"decode": 1}
    assert stats.ok_clip_seconds == {"c1": 10.0, "c2": 2.5}  # a partial clip counts up to its last frame
    assert stats.partial_clips == {"c2"} and stats.failed_clips == {"c3"}
    assert stats.clips_done == 4
    assert stats.fallbacks_by_reason == {"model: oom": 1}  # two rows, one retried call
    assert stats.model == {"model_id": "m", "model_revision": "r", "model_random_weights": True}


def test_build_summary_totals_rates_and_flops_on_a_gpu_run() -> None:
    stats = RunStats()
    stats.update(_rows())
    summary = _summary(JobConfig(), stats, wall_s=3600.0)
    assert (summary["rows_ok"], summary["rows_error"], summary["rows_skipped"]) == (2, 1, 1)
    assert (summary["clips_ok"], summary["clips_partial"], summary["clips_failed"]) == (2, 1, 1)
    assert summary["video_seconds_processed"] == 12.5 and summary["clips_per_s"] == pytest.approx(2 / 3600)
    assert summary["output_tokens"] == 16 and summary["output_tokens_per_s"] == pytest.approx(16 / 3600)
    assert summary["retention_achieved_mean"] == pytest.approx(0.3) and summary["retention_asked_mean"] == 0.25
    assert summary["flops_saved_fraction"] == pytest.approx(1 - 60 / 200)
    assert summary["resumed_keys_skipped"] == 3 and summary["files_written"] == 2 and summary["run_date"] == "2026-11-30"
    # 2 GPUs in the cluster, 1 per actor: 2 actors for 1 hour = 2 GPU-hours for 12.5 video-seconds
    assert summary["accelerator"] == "gpu" and summary["gpu_hours"] == pytest.approx(2.0)
    assert summary["video_hours_per_gpu_hour"] == pytest.approx(12.5 / 3600 / 2)
    assert summary["cost_per_video_hour_usd"] == pytest.approx(2.0 * 3.0 / (12.5 / 3600))
    assert summary["fallback_calls"] == 1 and summary["self_check"] == "passed"


def test_a_cpu_run_reports_cpu_hours_instead_of_gpu_figures() -> None:
    cfg = JobConfig()
    cfg.actors.num_gpus = 0
    figures = efficiency(cfg, wall_s=1800.0, video_s=36.0, cluster_cpus=4, cluster_gpus=0)
    assert figures["accelerator"] == "cpu" and figures["cpu_hours"] == pytest.approx(2.0)
    assert figures["video_hours_per_cpu_hour"] == pytest.approx(0.01 / 2)
    assert figures["video_hours_per_gpu_hour"] is None and figures["cost_per_video_hour_usd"] is None
    stats = RunStats()
    stats.update(_rows())
    text = format_summary(_summary(cfg, stats, wall_s=1800.0, cluster_gpus=0), stats.examples)
    lines = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.splitlines()[1:] if "e.g." not in line)
    assert lines["video-hours per GPU-hour"] == CPU_RUN
    assert lines["video-hours per CPU-hour"] == "0.003472"  # 12.5 video-s / (0.5 h x 2 CPUs)
    assert lines["rows ok / error / skipped"] == "2 / 1 / 1" and lines["prefill FLOPs saved"] == "70.0 %"
    assert "m (random weights)" in text and "e.g. /v/a.mp4 #0: 'a caption'" in text


def test_summaries_of_an_older_schema_version_are_upgraded_so_polars_reads_the_folder(tmp_path) -> None:
    """Schema version 4 added the summary's inputs_device: a run of it beside older runs' summaries
    would leave summaries/ mixed, which the docs' Polars query refuses. Older files are rewritten,
    their values kept; a folder already current is left alone."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline._summary import summary_uri, upgrade_older_summaries
    from pipeline.schema import SCHEMA_VERSION, SCHEMA_VERSION_KEY, SUMMARY_FILE_SCHEMA, schema_version
    from pipeline.storage import Storage

    out = str(tmp_path / "out")
    version_3 = pa.schema([f for f in SUMMARY_FILE_SCHEMA if f.name != "inputs_device"], metadata={SCHEMA_VERSION_KEY: b"3"})
    runs = [("2026-11-28", "20261128T000000Z-aaaaaa", version_3), ("2026-11-29", "20261129T000000Z-bbbbbb", version_3),
            ("2026-12-01", "20261201T000000Z-cccccc", SUMMARY_FILE_SCHEMA)]
    for run_date, run_id, schema in runs:
        row = conform({"run_id": [run_id], "rows_ok": [3], "inputs_device": ["cuda:0"]}, SUMMARY_FILE_SCHEMA)
        path = summary_uri(out, "caption", run_date, run_id)
        Storage().write_parquet_atomic(row.select(schema.names).cast(schema), path)
    glob = f"{out}/summaries/**/*.parquet"
    with pytest.raises(pl.exceptions.PolarsError):  # what a mixed folder does to the docs' query
        pl.read_parquet(glob, hive_partitioning=True)

    logged: list[str] = []
    upgrade_older_summaries(Storage(), out, "caption", logged.append)
    assert logged == [f"[write] upgraded the summaries of schema version [3] to version {SCHEMA_VERSION}"]
    paths = [summary_uri(out, "caption", d, r) for d, r, _ in runs]
    assert [schema_version(pq.read_schema(p)) for p in paths] == [SCHEMA_VERSION] * 3
    frame = pl.read_parquet(glob, hive_partitioning=True).sort("run_id")
    assert frame.select("run_id", "rows_ok", "inputs_device").rows() == [
        (runs[0][1], 3, None), (runs[1][1], 3, None), (runs[2][1], 3, "cuda:0")]
    upgrade_older_summaries(Storage(), out, "caption", logged.append)
    assert len(logged) == 1  # current already: nothing rewritten
