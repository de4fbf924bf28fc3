"""Everything the pipeline writes as Parquet, declared once. See docs/schema.md.

    ROW_SCHEMA      one row per (clip, prompt): ok, skipped and error rows alike (error rows go to
                    their own `-errors.parquet` files, with the same schema, so one glob reads both)
    SUMMARY_SCHEMA  one row per run: <output>/summaries/job=<job>/run_date=<date>/summary-<run_id>.parquet

`job` and `run_date` are Hive partition columns: they live in the directory names, not inside
the Parquet files, because readers (pyarrow, DuckDB, Spark) refuse a column that is both in the
file and in the path with different types. `FILE_SCHEMA` / `SUMMARY_FILE_SCHEMA` are what the files
hold; `ROW_SCHEMA` / `SUMMARY_SCHEMA` are what a reader sees with `PARTITIONING_SCHEMA`, which
declares `run_date` a DATE: DuckDB, Polars and Spark infer that from `2026-11-29`, and pyarrow and
pandas get it by passing this partitioning (docs/schema.md shows it written out).

Every file carries SCHEMA_VERSION in its Parquet key-value metadata (SCHEMA_VERSION_KEY); a
change to a column's name, type or meaning bumps it, and docs/schema.md lists each version.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

STATUSES = ("ok", "error", "skipped")
PARTITION_COLUMNS = ("job", "run_date")
SCHEMA_VERSION = 4  # 1: before 2026-11-30 (run_date a string, peak_memory_bytes, no skip_reason); 2: no video_prefill_*; 3: no inputs_*
SCHEMA_VERSION_KEY = b"v2drop_batch.schema_version"

_UTC_US = pa.timestamp("us", tz="UTC")

ROW_SCHEMA = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),  # input as listed (absolute path or s3://)
        pa.field("clip_index", pa.int32()),  # 0-based clip position in its video; null when not probed
        pa.field("start_s", pa.float64()),  # clip span start, seconds from the video start
        pa.field("end_s", pa.float64()),  # clip span end (exclusive)
        pa.field("clip_id", pa.string(), nullable=False),  # uuid5(video, span, settings): the resume key with prompt
        pa.field("prompt", pa.string(), nullable=False),  # caption or question text; '' for video/clip-level rows
        pa.field("output_text", pa.string()),  # the model's answer; null unless status ok
        pa.field("status", pa.string(), nullable=False),  # ok | error | skipped
        pa.field("error", pa.string()),  # what went wrong, naming the file; null unless status error
        pa.field("error_stage", pa.string()),  # probe | decode | model; null unless status error
        pa.field("skip_reason", pa.string()),  # why nothing was captioned, naming the file; null unless skipped
        pa.field("model_id", pa.string()),  # model.source as written (hub id, path, s3://, tiny:<family>)
        pa.field("model_revision", pa.string()),  # hub commit, or null
        pa.field("model_random_weights", pa.bool_()),  # true for tiny:<family> models: text is noise
        pa.field("retention_asked", pa.float64()),  # model.retention
        pa.field("retention_achieved", pa.float64()),  # layer-averaged visual-token retention measured
        pa.field("visual_tokens_per_stage", pa.list_(pa.int64())),  # before drop_layers[0], then after each drop layer
        pa.field("drop_layers", pa.list_(pa.int32())),  # V²Drop drop layers actually used; [] when off
        pa.field("drop_keep", pa.list_(pa.float64())),  # relative keep per drop layer; visual_tokens_per_stage follows these
        pa.field("prompt_tokens", pa.int64()),  # input tokens (text + visual, before dropping)
        pa.field("output_tokens", pa.int64()),  # generated tokens
        pa.field("decode_ms", pa.float64()),  # video decode time of the clip (per clip, repeated on its prompts' rows)
        pa.field("inputs_ms", pa.float64()),  # PER CALL (batch_id): building its inputs (processor, copy to the device), before prefill_ms
        pa.field("prefill_ms", pa.float64()),  # PER CALL (batch_id): start of the call to the first token's logits
        pa.field("generate_ms", pa.float64()),  # PER CALL (batch_id): the whole call, prefill and every decode step
        pa.field("prefill_ms_share", pa.float64()),  # this row's part of prefill_ms, by its share of the call's flops_dropped
        pa.field("generate_ms_share", pa.float64()),  # prefill_ms_share + an equal share of the decode steps; sums to generate_ms per call
        pa.field("flops_full", pa.float64()),  # estimated prefill FLOPs without dropping
        pa.field("flops_dropped", pa.float64()),  # estimated prefill FLOPs with V²Drop
        pa.field("peak_device_memory_bytes", pa.int64()),  # PER CALL, GPU runs: torch.cuda.max_memory_allocated; null on CPU
        pa.field("peak_host_rss_bytes", pa.int64()),  # PER CALL, CPU runs: the actor's peak resident set size; null on GPU
        pa.field("worker_host", pa.string()),  # host name of the model actor
        pa.field("decoder", pa.string()),  # decord | pyav
        pa.field("last_frame_s", pa.float64()),  # time of the last frame the model saw; null unless decoded
        pa.field("partial_reason", pa.string()),  # why the frames stop before end_s (damage, file cut short); else null
        pa.field("batch_id", pa.string()),  # the generate call that made the row: the PER CALL columns are this call's
        pa.field("fallback_reason", pa.string()),  # set when the row came from retrying a failed call (e.g. 'ValueError: retried item by item')
        pa.field("fallback_batch_id", pa.string()),  # ... the id given to that failed call (the summary counts distinct ones)
        pa.field("video_prefill_shared", pa.bool_()),  # true: the clip's video was prefilled once for all its prompts in the call
        pa.field("video_prefill_unshared_reason", pa.string()),  # why generation.share_video_prefix could not share it; else null
        # Provenance (workers.provenance): what produced the row. Null on rows no model actor saw.
        pa.field("engine_fingerprint", pa.string()),  # hash of model source+revision, dtype, attention, retention, engine version: the resume key's context
        pa.field("model_dtype", pa.string()),  # dtype the model ran in (e.g. bfloat16; float32 on CPU)
        pa.field("attn_implementation", pa.string()),  # attention the model ran with (flash_attention_2 falls back to sdpa without CUDA)
        pa.field("self_check", pa.string()),  # v2drop.self_check outcome in the actor, e.g. 'passed (qwen2_5_vl, transformers 5.24.0, 1.2 s)'
        pa.field("inputs_device", pa.string()),  # where the video processor ran (resize, normalize, patchify): cpu or e.g. cuda:0
        pa.field("project_version", pa.string()),  # v2drop-batch version
        pa.field("git_commit", pa.string()),  # commit of the running code ('-dirty' if changed), null when unknown
        pa.field("torch_version", pa.string()),
        pa.field("transformers_version", pa.string()),
        pa.field("ray_version", pa.string()),
        pa.field("started_at", _UTC_US),  # when the pipeline started work on the clip: decode start; null for rows never decoded
        pa.field("finished_at", _UTC_US),  # when the row was made: the end of its model call, or of the stage that failed/skipped it
        pa.field("job", pa.string(), nullable=False),  # partition: job name
        pa.field("run_id", pa.string(), nullable=False),  # the run that wrote the row
        pa.field("run_date", pa.date32(), nullable=False),  # partition: UTC date the run started
        pa.field("metadata", pa.map_(pa.string(), pa.string())),  # manifest columns other than uri/questions
        # The shadow quality guard (workers.shadow): null unless the clip is in quality.shadow_fraction's sample.
        pa.field("shadow_output_text", pa.string()),  # the same item's output with V²Drop off
        pa.field("shadow_exact_match", pa.bool_()),  # output_text == shadow_output_text (trimmed)
        pa.field("shadow_token_f1", pa.float64()),  # bag-of-words F1 of the two outputs, in [0, 1]
        pa.field("shadow_lcs_ratio", pa.float64()),  # 2 * longest common word subsequence / total words, in [0, 1]
        pa.field("shadow_first_diff_word", pa.int32()),  # first word index where they differ; null when equal
        pa.field("shadow_top1_agree", pa.bool_()),  # same most likely first token, dropped and full
        pa.field("shadow_kl_first_token", pa.float64()),  # KL(full || dropped) of the first-token distributions, nats
        pa.field("shadow_ms", pa.float64()),  # the shadow's wall time, this row's equal share of its call
        pa.field("shadow_flops", pa.float64()),  # analytic prefill FLOPs the shadow spent on this row
    ]
)

_VERSION_METADATA = {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()}
ROW_SCHEMA = ROW_SCHEMA.with_metadata(_VERSION_METADATA)
FILE_SCHEMA = pa.schema([f for f in ROW_SCHEMA if f.name not in PARTITION_COLUMNS], metadata=_VERSION_METADATA)

# How a reader gets `job` (string) and `run_date` (date) back from the directory names.
PARTITIONING_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in PARTITION_COLUMNS])

QUALITY_TYPE = pa.struct([  # pipeline._quality.QualityStats.block
    ("shadow_fraction", pa.float64()), ("clips_compared", pa.int64()), ("rows_compared", pa.int64()),
    ("agreement_measure", pa.string()), ("agreement_mean", pa.float64()), ("agreement_p10", pa.float64()),
    ("token_f1_mean", pa.float64()), ("exact_match_rate", pa.float64()), ("top1_agreement_rate", pa.float64()),
    ("kl_first_token_mean", pa.float64()), ("min_agreement", pa.float64()), ("enforce", pa.bool_()),
    ("verdict", pa.string()), ("shadow_s", pa.float64()), ("shadow_flops", pa.float64()),
    ("shadow_flops_vs_run", pa.float64()),
])

SUMMARY_SCHEMA = pa.schema(
    [  # one row per run (pipeline._summary.build_summary); null where a run has nothing to measure
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("ray_job_submission_id", pa.string()),  # `ray job submit`'s id when run under it, else null
        pa.field("output_uri", pa.string()),
        pa.field("started_at", _UTC_US), pa.field("finished_at", _UTC_US),
        pa.field("wall_s", pa.float64()),
        pa.field("planned_rows", pa.int64()), pa.field("resumed_keys_skipped", pa.int64()),
        pa.field("rows_ok", pa.int64()), pa.field("rows_error", pa.int64()), pa.field("rows_skipped", pa.int64()),
        pa.field("errors_by_stage", pa.map_(pa.string(), pa.int64())),  # error rows per error_stage
        pa.field("clips_ok", pa.int64()), pa.field("clips_partial", pa.int64()), pa.field("clips_failed", pa.int64()),
        pa.field("video_seconds_processed", pa.float64()),  # a partial clip counts up to its last frame
        pa.field("clips_per_s", pa.float64()),
        pa.field("prompt_tokens", pa.int64()), pa.field("output_tokens", pa.int64()),
        pa.field("output_tokens_per_s", pa.float64()),
        pa.field("accelerator", pa.string()),  # gpu | cpu
        pa.field("gpu_hours", pa.float64()), pa.field("video_hours_per_gpu_hour", pa.float64()),
        pa.field("gpu_hourly_usd", pa.float64()), pa.field("cost_per_video_hour_usd", pa.float64()),
        pa.field("cpu_hours", pa.float64()), pa.field("video_hours_per_cpu_hour", pa.float64()),
        pa.field("retention_asked_mean", pa.float64()), pa.field("retention_achieved_mean", pa.float64()),
        pa.field("flops_full", pa.float64()), pa.field("flops_dropped", pa.float64()),
        pa.field("flops_saved_fraction", pa.float64()),
        pa.field("model_id", pa.string()), pa.field("model_revision", pa.string()),
        pa.field("model_random_weights", pa.bool_()),
        pa.field("files_written", pa.int64()),
        pa.field("config_yaml", pa.string()),  # the resolved config, secrets removed
        pa.field("fallback_calls", pa.int64()),
        pa.field("fallbacks_by_reason", pa.map_(pa.string(), pa.int64())),
        pa.field("self_check", pa.string()),
        pa.field("model_dtype", pa.string()), pa.field("attn_implementation", pa.string()),
        pa.field("inputs_device", pa.string()),
        pa.field("engine_fingerprint", pa.string()),
        pa.field("drop_layers", pa.list_(pa.int32())), pa.field("drop_keep", pa.list_(pa.float64())),
        pa.field("driver_project_version", pa.string()), pa.field("driver_git_commit", pa.string()),
        pa.field("driver_torch_version", pa.string()), pa.field("driver_transformers_version", pa.string()),
        pa.field("driver_ray_version", pa.string()),
        pa.field("quality", QUALITY_TYPE),
        pa.field("job", pa.string(), nullable=False),  # partition
        pa.field("run_date", pa.date32(), nullable=False),  # partition
    ],
    metadata=_VERSION_METADATA,
)
SUMMARY_FILE_SCHEMA = pa.schema([f for f in SUMMARY_SCHEMA if f.name not in PARTITION_COLUMNS],
                                metadata=_VERSION_METADATA)


def schema_version(schema: pa.Schema) -> int:
    """The SCHEMA_VERSION a file was written with; 1 for files from before versions were recorded."""
    value = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    return int(value) if value is not None else 1


def conform(rows: dict[str, list[Any]] | pa.Table, schema: pa.Schema = FILE_SCHEMA) -> pa.Table:
    """A table with exactly `schema`'s columns, in order: missing columns are null, extra dropped.

    Errors name the column, so a worker that returns a wrong type is found at once.
    """
    columns = rows.column_names if isinstance(rows, pa.Table) else list(rows)
    num_rows = rows.num_rows if isinstance(rows, pa.Table) else len(next(iter(rows.values()), []))
    arrays = []
    for f in schema:
        if f.name not in columns:
            arrays.append(pa.nulls(num_rows, f.type))
            continue
        values = rows[f.name]  # from_pandas: numpy batches carry a null number as NaN
        try:
            arrays.append(pa.array(values, type=f.type, from_pandas=True) if not isinstance(values, (pa.Array, pa.ChunkedArray))
                          else values.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
            raise TypeError(f"output column {f.name!r} cannot be stored as {f.type}: {e}") from e
    return pa.Table.from_arrays(arrays, schema=schema)  # keeps schema.metadata: the version
