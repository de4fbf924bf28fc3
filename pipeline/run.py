"""`run(cfg)`: the whole job as numbered stages on Ray Data. Start here.

    stage (module)                  where   rows                                  cardinality
    0. preflight (preflight.py)     driver  checks before Ray, the output's lease, finished keys read back (resume)
    1. discover  (_discover.py)     driver  one row per video (manifests read here)  1:1 with the inputs
    2. probe     (_probe.py)        tasks   container metadata or an error row     1:1
    3. shard     (_shard.py)        tasks   one row per clip still to run          1:N (skipped: 1 row)
    4. decode    (_decode.py)       tasks   frames as bytes + shape + dtype        1:1
    5. model     (_model.py)        actors  one row per (clip, prompt)             1:N (qa: one per question)
    6. write     (_write.py)        driver  Parquet parts, ok+skipped / errors     atomic files, then
                 (_consolidate.py)          compaction; the older rows they replace go
    7. summary   (_summary.py)      driver  summaries/.../summary-<run_id>.parquet, runs/<run_id>/summary.json + report.html

Every column that flows between stages is listed in the stage module's docstring; the output
rows are `pipeline.schema.ROW_SCHEMA` (docs/schema.md). Worked example, one 13 s video with
clip_len_s=5 and task=qa with two questions: 1 row after discover and probe, 3 after shard
([0,5) [5,10) [10,13)), 3 after decode, 6 after the model.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from pipeline import _write
from pipeline._consolidate import consolidate
from pipeline._decode import decode_batch
from pipeline._model import ModelStage, model_stage_kwargs, run_fingerprint
from pipeline._output import to_output_table
from pipeline._probe import probe_batch
from pipeline._shard import settings_key, shard_batch, video_clip_id
from pipeline._summary import RunStats, build_summary, format_summary, upgrade_older_summaries, write_summary
from pipeline.config import JobConfig, to_yaml
from pipeline.lease import LeaseLost
from pipeline.logs import get_logger, info, quiet_ray_data_console
from pipeline.preflight import Plan, prepare
from pipeline.progress import Progress
from pipeline.redact import redact
from pipeline.storage import Storage
from workers.settings import default_cache_dir

VIDEOS_PER_PROBE_TASK = 4  # probing is ~0.1 s per video: a few per task amortise task overhead
CLIPS_PER_DECODE_TASK = 2  # frames are big (16 x 448 x 448 x 3 B = 9.6 MB a clip): keep blocks small
DECODE_TASK_MEMORY_BYTES = 512 * 2**20  # decoder child process + CLIPS_PER_DECODE_TASK clips of frames
VIDEO_CACHE_SUBDIR = "videos"  # node-local copies of s3:// videos, under model.cache_dir
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` for the driver it starts


class ModelLoadError(RuntimeError):
    """No model actor could load the model: nothing can be captioned (CLI exit code 3)."""


def run(cfg: JobConfig, *, log: Callable[[str], None] = info, model_stage: type = ModelStage,
        plan: Plan | None = None) -> dict[str, Any]:
    """Run the job on the connected Ray cluster (or a local one) and return the summary dict.

    `model_stage` is the actor class of stage 5 (constructor: run_id, the driver's engine fingerprint
    and `model_stage_kwargs`).
    `plan`: stages 0-1 already done by `pipeline.preflight.prepare` (the CLI does them before
    Ray starts); its lease is released when the run ends, however it ends.
    """
    log = _redacting(log)
    storage = Storage(cfg.storage)
    plan = plan or prepare(cfg, storage, log)  # 0-1
    try:
        return _run_stages(cfg, storage, plan, log, model_stage)
    finally:
        plan.release()


def error_fraction(summary: dict[str, Any]) -> float:
    """Error rows of this run over the job's keys (this run's rows + keys finished before it).

    A resume that retries 5 failed keys of 44 and fails them again is at 5/44, not 5/5.
    """
    rows = summary["rows_ok"] + summary["rows_error"] + summary["rows_skipped"] + summary["resumed_keys_skipped"]
    return summary["rows_error"] / rows if rows else 0.0


def _redacting(log: Callable[[str], None]) -> Callable[[str], None]:
    return lambda text: log(redact(text))


def ray_job_submission_id() -> str | None:
    """The id `ray job submit` gave this driver (from the job config Ray hands it), else None."""
    try:
        return json.loads(os.environ.get(RAY_JOB_CONFIG_ENV, "{}")).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def dataset_name(cfg: JobConfig, run_id: str) -> str:
    """What the Ray dashboard calls this run's datasets: the job, then the run."""
    return f"{cfg.job}-{run_id}"


def _run_stages(cfg: JobConfig, storage: Storage, plan: Plan, log: Callable[[str], None],
                model_stage: type) -> dict[str, Any]:
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = cfg.run.ray_progress_bars
    if not cfg.run.ray_progress_bars:  # asked for Ray Data's own display: leave its console alone
        quiet_ray_data_console()
    videos = plan.videos
    clips = (
        ray.data.from_arrow(_blocks(videos, VIDEOS_PER_PROBE_TASK))
        .map_batches(probe_batch, fn_kwargs=_io_kwargs(cfg, storage, timeout_s=cfg.decode.timeout_s),  # 2. 1:1
                     batch_size=VIDEOS_PER_PROBE_TASK, batch_format="pyarrow", num_cpus=cfg.decode.num_cpus)
        .map_batches(shard_batch, fn_kwargs=_shard_kwargs(cfg, plan.done),  # 3. 1:N
                     batch_size=None, batch_format="pyarrow", num_cpus=0.25)
        .materialize()  # the plan is small (no frames) and gives an exact "remaining" count
    )
    clips.set_name(f"{dataset_name(cfg, plan.run_id)}-plan")
    total, to_caption = clips.count(), _count_ok(clips)
    log(f"[plan] {videos.num_rows} videos -> {total} rows to write, {to_caption} clips to caption; "
        f"{len(plan.done)} keys already done")
    rows = clips.map_batches(to_output_table, fn_kwargs={"run_id": plan.run_id}, batch_format="pyarrow")
    if to_caption:  # no model actors (and no model load) when nothing is left to caption
        rows = (
            clips.repartition(max(1, total // CLIPS_PER_DECODE_TASK))
            # The memory reservation (the decoder child process plus a batch of frames) also keeps
            # Ray Data from fusing decode into the model actors when both ask for 1 CPU, 0 GPUs.
            .map_batches(decode_batch, fn_kwargs={"decode": cfg.decode, **_io_kwargs(cfg, storage)},  # 4. 1:1
                         batch_size=CLIPS_PER_DECODE_TASK, batch_format="pyarrow", num_cpus=cfg.decode.num_cpus,
                         memory=DECODE_TASK_MEMORY_BYTES)
            .map_batches(model_stage, fn_constructor_kwargs={"run_id": plan.run_id, "fingerprint": run_fingerprint(cfg),  # 5. 1:N
                                                             **model_stage_kwargs(cfg)},
                         compute=ray.data.ActorPoolStrategy(min_size=cfg.actors.min_size, max_size=cfg.actors.max_size),
                         num_gpus=cfg.actors.num_gpus, batch_size=cfg.actors.batch_size, batch_format="pyarrow")
        )
    rows.set_name(dataset_name(cfg, plan.run_id))
    stats, files = write_rows(rows, cfg, storage, plan, total, log)  # 6
    summary = summarize(cfg, storage, plan, stats, files, total)  # 7
    upgrade_older_summaries(storage, cfg.output.uri, cfg.job, log, plan.lease.check)
    log(format_summary(summary, stats.examples))
    if cfg.run.report:
        write_run_report(storage, summary, files, log)
    return summary


# --- 2-5. stages ---------------------------------------------------------------------------


def _blocks(table: pa.Table, rows_per_block: int) -> list[pa.Table]:
    """Split so the probe stage runs in parallel (a single block would be a single task)."""
    rows_per_block = max(rows_per_block, -(-table.num_rows // 1000))  # at most ~1000 blocks
    return [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]


def _io_kwargs(cfg: JobConfig, storage: Storage, **extra: Any) -> dict[str, Any]:
    return {"storage": storage, "cache_dir": str(default_cache_dir(cfg.model.cache_dir) / VIDEO_CACHE_SUBDIR), **extra}


def _shard_kwargs(cfg: JobConfig, done: set[tuple[str, str]]) -> dict[str, Any]:
    return {"clips": cfg.clips, "settings": settings_key(cfg), "prompt_cfg": cfg.prompt, "done": done}


def _count_ok(clips: Any) -> int:
    return sum(int((b["status"] == "ok").sum()) for b in clips.iter_batches(batch_size=None, batch_format="numpy"))


# --- 6. write -------------------------------------------------------------------------------


def write_rows(
    rows: Any, cfg: JobConfig, storage: Storage, plan: Plan, total: int, log: Callable[[str], None]
) -> tuple[RunStats, list[str]]:
    """Pull output blocks to the driver as they finish and write them as part files, at least
    every run.flush_interval_s; then compact them and drop the older rows they replace."""
    partition = f"{_write.job_data_uri(cfg.output.uri, cfg.job)}/run_date={plan.run_date}"
    writer = _write.PartWriter(storage, partition, plan.run_id, set(plan.done), cfg.run.flush_interval_s,
                               cfg.run.flush_rows, before_write=plan.lease.check)
    stats = RunStats()
    progress = Progress(total, stats, every_s=cfg.run.progress_every_s, out=log)
    with _write.FlushTimer(writer) as timer:
        try:
            for batch in rows.iter_batches(batch_size=None, batch_format="pyarrow"):
                timer.check()
                stats.update(writer.add(batch))
                progress.tick()
        except Exception as e:
            if not isinstance(e, _write.OutputError | LeaseLost):
                writer.flush()  # keep what finished; a re-run resumes from it
            raise _model_load_error(e) or e  # noqa: B904 - the model-load error names its cause itself
        writer.flush()
    timer.check()
    progress.tick(force=True)
    plan.lease.check()
    # every video was probed: an older probe error of one is stale, or its new error row replaces it
    probed = {(video_clip_id(uri, settings_key(cfg)), "") for uri in plan.videos.column("video_uri").to_pylist()}
    return stats, consolidate(storage, writer, plan.state, replace_all=not cfg.run.resume, log=log, probed=probed)


def _model_load_error(error: BaseException) -> ModelLoadError | None:
    """A model actor whose construction failed means no actor could load the model. Ray raises
    that as a RayActorError (ActorDiedError) with `actor_init_failed`, possibly as the cause of
    another error; an actor that dies later (a crash mid-batch) is not a load failure."""
    from ray.exceptions import RayActorError

    if any(isinstance(e, RayActorError) and e.actor_init_failed for e in _causes(error)):
        text = f"{type(error).__name__}: {error}"
        return ModelLoadError(f"the model could not be loaded by any actor (model.source, model.dtype, "
                              f"model.attn_implementation): {_tail_lines(text, 2000)}")
    return None


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it was raised from, outermost first (a cycle stops the walk)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and not any(current is seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _tail_lines(text: str, max_chars: int) -> str:
    """The last whole lines of `text` within `max_chars` (the cause is at the end of a traceback)."""
    lines, kept = text.strip().splitlines(), []
    while lines and sum(map(len, kept)) + len(lines[-1]) <= max_chars:
        kept.insert(0, lines.pop())
    return "\n".join(kept) or text[-max_chars:]


# --- 7. summary -----------------------------------------------------------------------------


def summarize(cfg: JobConfig, storage: Storage, plan: Plan, stats: RunStats, files: list[str], total: int) -> dict[str, Any]:
    import ray

    resources = ray.cluster_resources()
    summary = build_summary(
        stats, cfg, run_id=plan.run_id, started_at=plan.started_at, finished_at=dt.datetime.now(dt.UTC),
        planned_rows=total, resumed_keys=len(plan.done), cluster_cpus=resources.get("CPU", 0.0),
        cluster_gpus=resources.get("GPU", 0.0), files=files, config_yaml=to_yaml(cfg), engine_fingerprint=run_fingerprint(cfg),
        ray_job_submission_id=ray_job_submission_id(),
    )
    summary = {k: redact(v) if isinstance(v, str) else v for k, v in summary.items()}  # error examples
    run_dir = _write.run_dir_uri(cfg.output.uri, cfg.job, plan.run_id)
    with _write.writing(run_dir):
        write_summary(storage, run_dir, summary)
    return summary


def write_run_report(storage: Storage, summary: dict[str, Any], files: list[str], log: Callable[[str], None]) -> None:
    """report.html beside summary.json (pipeline.report); a report that fails is logged, never
    fails a run whose rows and summary are already written."""
    from pipeline.report import write_report

    run_dir = _write.run_dir_uri(summary["output_uri"], summary["job"], summary["run_id"])
    try:
        uri = write_report(storage, run_dir, summary, files)
    except Exception as e:  # noqa: BLE001 - the run's outputs are complete; the report is a view of them
        get_logger("run").warning("the run report could not be written (%s: %s); rows and summary are complete",
                                  type(e).__name__, e)
        return
    log(f"[report] {uri}")
