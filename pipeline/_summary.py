"""Stage 7, summary (driver): run totals from the rows written, as JSON + Parquet + a table.

Files: <output>/summaries/job=<job>/run_date=<date>/summary-<run_id>.parquet (one row of
`pipeline.schema.SUMMARY_SCHEMA`, the same types in every run, empty runs too), and for people
<output>/runs/job=<job>/<run_id>/summary.json beside config.yaml and the run report.

Efficiency is per accelerator-hour of the pool: GPU-hours = wall time * actors * GPUs per actor.
A CPU run (actors.num_gpus 0) has no GPU-hours: its video-hours per GPU-hour and cost are
'n/a (CPU run)', and video-hours per CPU-hour (wall time * the cluster's CPUs) are given instead.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline._quality import QualityStats, format_quality
from pipeline._write import summaries_uri
from pipeline.config import JobConfig
from pipeline.schema import PARTITION_COLUMNS, SCHEMA_VERSION, SUMMARY_FILE_SCHEMA, conform, schema_version
from pipeline.storage import Storage
from workers.provenance import software_versions

CPU_RUN = "n/a (CPU run)"
# What the model actors ran with, as the rows say (workers.provenance); summarised per run.
ENGINE_COLUMNS = ("engine_fingerprint", "model_dtype", "attn_implementation", "inputs_device", "drop_layers", "drop_keep")


@dataclass
class RunStats:
    """Running totals over the rows this run wrote (updated per batch by the driver)."""

    rows_by_status: Counter = field(default_factory=Counter)
    errors_by_stage: Counter = field(default_factory=Counter)
    ok_clip_seconds: dict[str, float] = field(default_factory=dict)  # clip_id -> seconds the model saw
    failed_clips: set[str] = field(default_factory=set)
    partial_clips: set[str] = field(default_factory=set)  # ok clips served from frames before damage
    output_tokens: int = 0
    prompt_tokens: int = 0
    retention_asked_sum: float = 0.0
    retention_achieved_sum: float = 0.0
    retention_rows: int = 0
    flops_full: float = 0.0
    flops_dropped: float = 0.0
    model: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)  # ENGINE_COLUMNS of the first model row
    self_checks: set[str] = field(default_factory=set)  # each actor's self-check outcome
    fallback_calls: dict[str, set[str]] = field(default_factory=dict)  # reason -> failed generate calls
    examples: list[dict[str, Any]] = field(default_factory=list)
    quality: QualityStats = field(default_factory=QualityStats)  # the shadow rows (pipeline._quality)

    @property
    def fallbacks_by_reason(self) -> dict[str, int]:
        """Failed model-stage generate calls that were retried, per reason ('model: ...')."""
        return {f"model: {reason}": len(calls) for reason, calls in sorted(self.fallback_calls.items())}

    @property
    def clips_done(self) -> int:
        return len(self.ok_clip_seconds.keys() | self.failed_clips) + self.rows_by_status["skipped"]

    def update(self, table: pa.Table) -> None:
        self.rows_by_status.update(table["status"].to_pylist())
        errors = table.filter(pc.equal(table["status"], "error"))
        self.errors_by_stage.update(errors["error_stage"].to_pylist())
        self._update_clips(table)
        self._update_engine(table)
        ok = table.filter(pc.equal(table["status"], "ok"))
        if ok.num_rows:
            self._update_model(ok)
            self.quality.update(ok)

    def _update_clips(self, table: pa.Table) -> None:
        columns = ["clip_id", "status", "start_s", "end_s", "last_frame_s", "partial_reason"]
        for row in table.select(columns).to_pylist():
            if row["status"] == "ok":
                # A partial clip's text covers only [start_s, last_frame_s]; count no more than that.
                end = row["last_frame_s"] if row["partial_reason"] else row["end_s"]
                self.ok_clip_seconds[row["clip_id"]] = end - row["start_s"]
                if row["partial_reason"]:
                    self.partial_clips.add(row["clip_id"])
            elif row["status"] == "error":
                self.failed_clips.add(row["clip_id"])

    def _update_engine(self, table: pa.Table) -> None:
        for row in table.select(["self_check", "fallback_reason", "fallback_batch_id"]).to_pylist():
            if row["self_check"]:
                self.self_checks.add(row["self_check"])
            if row["fallback_reason"]:
                self.fallback_calls.setdefault(row["fallback_reason"], set()).add(row["fallback_batch_id"])
        ran = table.filter(pc.is_valid(table["engine_fingerprint"]))
        if ran.num_rows and not self.engine:
            self.engine = ran.select(list(ENGINE_COLUMNS)).slice(0, 1).to_pylist()[0]

    def _update_model(self, ok: pa.Table) -> None:
        self.output_tokens += int(pc.sum(ok["output_tokens"]).as_py() or 0)
        self.prompt_tokens += int(pc.sum(ok["prompt_tokens"]).as_py() or 0)
        self.retention_asked_sum += float(pc.sum(ok["retention_asked"]).as_py() or 0)
        self.retention_achieved_sum += float(pc.sum(ok["retention_achieved"]).as_py() or 0)
        self.retention_rows += ok.num_rows
        self.flops_full += float(pc.sum(ok["flops_full"]).as_py() or 0)
        self.flops_dropped += float(pc.sum(ok["flops_dropped"]).as_py() or 0)
        first = ok.slice(0, 1).to_pylist()[0]
        self.model = {k: first[k] for k in ("model_id", "model_revision", "model_random_weights")}
        if len(self.examples) < 5:
            self.examples += ok.select(["video_uri", "clip_index", "prompt", "output_text"]).slice(0, 5).to_pylist()


def build_summary(
    stats: RunStats, cfg: JobConfig, *, run_id: str, started_at: dt.datetime, finished_at: dt.datetime,
    planned_rows: int, resumed_keys: int, cluster_cpus: float, cluster_gpus: float, files: list[str], config_yaml: str,
    engine_fingerprint: str, ray_job_submission_id: str | None = None,
) -> dict[str, Any]:
    """The summary as plain JSON values (SUMMARY_SCHEMA's columns; `summary_table` types them)."""
    wall_s = max((finished_at - started_at).total_seconds(), 1e-9)
    video_s = sum(stats.ok_clip_seconds.values())
    return {
        "run_id": run_id, "job": cfg.job, "run_date": f"{started_at:%Y-%m-%d}",
        "ray_job_submission_id": ray_job_submission_id, "output_uri": cfg.output.uri,
        "started_at": started_at.isoformat(), "finished_at": finished_at.isoformat(), "wall_s": wall_s,
        "planned_rows": planned_rows, "resumed_keys_skipped": resumed_keys,
        "rows_ok": stats.rows_by_status["ok"], "rows_error": stats.rows_by_status["error"],
        "rows_skipped": stats.rows_by_status["skipped"], "errors_by_stage": dict(sorted(stats.errors_by_stage.items())),
        "clips_ok": len(stats.ok_clip_seconds), "clips_partial": len(stats.partial_clips),
        "clips_failed": len(stats.failed_clips - stats.ok_clip_seconds.keys()),
        "video_seconds_processed": video_s, "clips_per_s": len(stats.ok_clip_seconds) / wall_s,
        "prompt_tokens": stats.prompt_tokens, "output_tokens": stats.output_tokens,
        "output_tokens_per_s": stats.output_tokens / wall_s,
        **efficiency(cfg, wall_s, video_s, cluster_cpus, cluster_gpus),
        "retention_asked_mean": _mean(stats.retention_asked_sum, stats.retention_rows),
        "retention_achieved_mean": _mean(stats.retention_achieved_sum, stats.retention_rows),
        "flops_full": stats.flops_full, "flops_dropped": stats.flops_dropped,
        "flops_saved_fraction": 1 - stats.flops_dropped / stats.flops_full if stats.flops_full else None,
        "model_id": stats.model.get("model_id", cfg.model.source),
        "model_revision": stats.model.get("model_revision", cfg.model.revision),
        "model_random_weights": stats.model.get("model_random_weights"),
        "files_written": len(files), "config_yaml": config_yaml,
        "fallback_calls": sum(stats.fallbacks_by_reason.values()),
        "fallbacks_by_reason": stats.fallbacks_by_reason,
        "self_check": "; ".join(sorted(stats.self_checks)) or None,
        **{name: stats.engine.get(name) for name in ("model_dtype", "attn_implementation", "inputs_device")},
        "engine_fingerprint": engine_fingerprint,
        "drop_layers": stats.engine.get("drop_layers"),
        "drop_keep": stats.engine.get("drop_keep"),
        **{f"driver_{name}": value for name, value in software_versions().items()},
        "quality": stats.quality.block(cfg.quality, stats.flops_dropped),
    }


def efficiency(cfg: JobConfig, wall_s: float, video_s: float, cluster_cpus: float, cluster_gpus: float) -> dict[str, Any]:
    """Video-hours per GPU-hour and cost per video-hour; on CPU, per CPU-hour instead (labelled)."""
    video_h, wall_h = video_s / 3600, wall_s / 3600
    gpus_per_actor = cfg.actors.num_gpus
    if gpus_per_actor == 0:
        cpu_hours = wall_h * cluster_cpus
        return {"accelerator": "cpu", "gpu_hours": 0.0, "video_hours_per_gpu_hour": None, "gpu_hourly_usd": None,
                "cost_per_video_hour_usd": None, "cpu_hours": cpu_hours,
                "video_hours_per_cpu_hour": video_h / cpu_hours if cpu_hours else None}
    actors = max(1, min(cfg.actors.max_size, int(cluster_gpus // gpus_per_actor) or 1))
    gpu_hours = wall_h * actors * gpus_per_actor
    return {"accelerator": "gpu", "gpu_hours": gpu_hours,
            "video_hours_per_gpu_hour": video_h / gpu_hours, "gpu_hourly_usd": cfg.run.gpu_hourly_usd,
            "cost_per_video_hour_usd": gpu_hours * cfg.run.gpu_hourly_usd / video_h if video_h else None,
            "cpu_hours": None, "video_hours_per_cpu_hour": None}


def _mean(total: float, n: int) -> float | None:
    return total / n if n else None


def summary_uri(output_uri: str, job: str, run_date: str, run_id: str) -> str:
    """Where a run's summary row goes: a tree that holds only Parquet, partitioned as data/."""
    return f"{summaries_uri(output_uri, job)}/run_date={run_date}/summary-{run_id}.parquet"


def summary_table(summary: dict[str, Any]) -> pa.Table:
    """One row of SUMMARY_FILE_SCHEMA: declared types, so every run's file reads with every other."""
    row = {k: v for k, v in summary.items() if k not in PARTITION_COLUMNS}
    for name in ("started_at", "finished_at"):
        row[name] = dt.datetime.fromisoformat(row[name]) if isinstance(row[name], str) else row[name]
    for name in ("errors_by_stage", "fallbacks_by_reason"):
        row[name] = list((row.get(name) or {}).items())
    return conform({k: [v] for k, v in row.items()}, SUMMARY_FILE_SCHEMA)


def write_summary(storage: Storage, run_dir: str, summary: dict[str, Any]) -> None:
    storage.write_bytes_atomic(f"{run_dir}/summary.json", json.dumps(summary, indent=2, default=str).encode())
    storage.write_parquet_atomic(summary_table(summary),
                                 summary_uri(summary["output_uri"], summary["job"], summary["run_date"], summary["run_id"]))


def upgrade_older_summaries(storage: Storage, output_uri: str, job: str, log: Callable[[str], None],
                            before_write: Callable[[], None] = lambda: None) -> None:
    """Rewrite the job's summary files of an older schema version with SUMMARY_FILE_SCHEMA, as step 3
    does for data/ (pipeline._consolidate): one summaries/ folder never mixes schemas, which Polars
    refuses. The listing is in time order (run_date, then run_id) and versions only grow, so older
    files come first: the first file alone says whether any is older (one small read per run), and
    upgrading newest first keeps it older until every other one is done, should a run stop half-way."""
    files = storage.list_files(summaries_uri(output_uri, job), suffix=".parquet")
    if not files or schema_version(storage.read_parquet(files[0]).schema) >= SCHEMA_VERSION:
        return
    versions = set()
    for uri in reversed(files):
        table = storage.read_parquet(uri)
        if (version := schema_version(table.schema)) < SCHEMA_VERSION:
            before_write()
            storage.write_parquet_atomic(conform(table, SUMMARY_FILE_SCHEMA), uri)
            versions.add(version)
    log(f"[write] upgraded the summaries of schema version {sorted(versions)} to version {SCHEMA_VERSION}")


def format_summary(summary: dict[str, Any], examples: list[dict[str, Any]]) -> str:
    """The table printed at the end of a CLI run."""
    cpu = summary["accelerator"] == "cpu"
    lines = [
        ("run", f"{summary['job']} / {summary['run_id']}"),
        ("rows ok / error / skipped", f"{summary['rows_ok']} / {summary['rows_error']} / {summary['rows_skipped']}"),
        ("errors by stage", summary["errors_by_stage"]),
        ("retried model calls", f"{summary['fallback_calls']} {summary['fallbacks_by_reason']}"),
        ("engine self-check", summary["self_check"] or "not run (no model rows)"),
        ("keys already done (resume)", summary["resumed_keys_skipped"]),
        ("clips ok (partial) / failed", f"{summary['clips_ok']} ({summary['clips_partial']}) / {summary['clips_failed']}"),
        ("video seconds processed", f"{summary['video_seconds_processed']:.1f}"),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("clips/s", f"{summary['clips_per_s']:.3f}"),
        ("output tokens/s", f"{summary['output_tokens_per_s']:.1f}"),
        ("video-hours per GPU-hour", CPU_RUN if cpu else _num(summary["video_hours_per_gpu_hour"])),
        ("video-hours per CPU-hour" if cpu else "cost per video-hour",
         _num(summary["video_hours_per_cpu_hour"]) if cpu else f"${_num(summary['cost_per_video_hour_usd'])}"),
        ("retention asked / achieved", f"{_num(summary['retention_asked_mean'])} / {_num(summary['retention_achieved_mean'])}"),
        ("prefill FLOPs saved", _pct(summary["flops_saved_fraction"])),
        ("quality (shadow, V²Drop off)", format_quality(summary["quality"])),
        ("model", f"{summary['model_id']} (random weights)" if summary["model_random_weights"] else summary["model_id"]),
        ("output", summary["output_uri"]),
    ]
    width = max(len(k) for k, _ in lines)
    table = [f"  {k.ljust(width)}  {v}" for k, v in lines]
    table += [f"  e.g. {e['video_uri']} #{e['clip_index']}: {str(e['output_text'])[:80]!r}" for e in examples[:3]]
    return "\n".join(["run summary", *table])


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"
