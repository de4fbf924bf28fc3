"""The output row schema, defined once: one row per (clip, prompt). See docs/schema.md.

`job` and `run_date` are Hive partition columns: they live in the directory names
(`data/job=<job>/run_date=<date>/`), not inside the Parquet files, because readers (pyarrow,
DuckDB, Spark) refuse a column that is both in the file and in the path with different types.
`FILE_SCHEMA` is what each part file holds; `ROW_SCHEMA` is what a reader sees.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

STATUSES = ("ok", "error", "skipped")
PARTITION_COLUMNS = ("job", "run_date")

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
        pa.field("error", pa.string()),  # what went wrong, naming the file; null when ok
        pa.field("error_stage", pa.string()),  # discover | probe | shard | decode | model; null when ok
        pa.field("model_id", pa.string()),  # model.source as written (hub id, path, s3://, tiny:<family>)
        pa.field("model_revision", pa.string()),  # hub commit, or null
        pa.field("model_random_weights", pa.bool_()),  # true for tiny:<family> models: text is noise
        pa.field("retention_asked", pa.float64()),  # model.retention
        pa.field("retention_achieved", pa.float64()),  # layer-averaged visual-token retention measured
        pa.field("visual_tokens_per_stage", pa.list_(pa.int64())),  # before the first drop, then after each drop
        pa.field("prompt_tokens", pa.int64()),  # input tokens (text + visual, before dropping)
        pa.field("output_tokens", pa.int64()),  # generated tokens
        pa.field("decode_ms", pa.float64()),  # video decode time of the clip
        pa.field("prefill_ms", pa.float64()),  # model prefill time (batch time shared across its rows)
        pa.field("generate_ms", pa.float64()),  # model generate time, prefill included
        pa.field("flops_full", pa.float64()),  # estimated prefill FLOPs without dropping
        pa.field("flops_dropped", pa.float64()),  # estimated prefill FLOPs with V²Drop
        pa.field("peak_memory_bytes", pa.int64()),  # accelerator peak memory of the batch (0 on CPU)
        pa.field("worker_host", pa.string()),  # host name of the model actor
        pa.field("decoder", pa.string()),  # decord | pyav
        pa.field("last_frame_s", pa.float64()),  # time of the last frame the model saw; null unless decoded
        pa.field("partial_reason", pa.string()),  # why the frames stop before end_s (damage, file cut short); else null
        pa.field("batch_id", pa.string()),  # the generate call that made the row: prefill_ms, generate_ms, peak_memory_bytes are per call
        pa.field("fallback_reason", pa.string()),  # set when the row came from retrying a failed call (e.g. 'ValueError: retried item by item')
        pa.field("fallback_batch_id", pa.string()),  # ... the id given to that failed call (the summary counts distinct ones)
        # Provenance (workers.provenance): what produced the row. Null on rows no model actor saw.
        pa.field("engine_fingerprint", pa.string()),  # hash of model source+revision, dtype, attention, retention, engine version: the resume key's context
        pa.field("model_dtype", pa.string()),  # dtype the model ran in (e.g. bfloat16; float32 on CPU)
        pa.field("attn_implementation", pa.string()),  # attention the model ran with (flash_attention_2 falls back to sdpa without CUDA)
        pa.field("drop_layers", pa.list_(pa.int32())),  # V²Drop drop layers actually used; [] when off
        pa.field("drop_keep", pa.list_(pa.float64())),  # relative keep per drop layer; visual_tokens_per_stage follows these
        pa.field("self_check", pa.string()),  # v2drop.self_check outcome in the actor, e.g. 'passed (qwen2_5_vl, transformers 5.24.0, 1.2 s)'
        pa.field("project_version", pa.string()),  # v2drop-batch version
        pa.field("git_commit", pa.string()),  # commit of the running code ('-dirty' if changed), null when unknown
        pa.field("torch_version", pa.string()),
        pa.field("transformers_version", pa.string()),
        pa.field("ray_version", pa.string()),
        pa.field("started_at", _UTC_US),  # when work on this row started (decode start)
        pa.field("finished_at", _UTC_US),  # when the row was finished
        pa.field("job", pa.string(), nullable=False),  # partition: job name
        pa.field("run_id", pa.string(), nullable=False),  # the run that wrote the row
        pa.field("run_date", pa.string(), nullable=False),  # partition: UTC date of the run, YYYY-MM-DD
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

FILE_SCHEMA = pa.schema([f for f in ROW_SCHEMA if f.name not in PARTITION_COLUMNS])

# How a reader gets `job` and `run_date` back as plain strings from the directory names.
PARTITIONING_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in PARTITION_COLUMNS])


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
    return pa.Table.from_arrays(arrays, schema=schema)
