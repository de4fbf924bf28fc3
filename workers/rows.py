"""The model stage's output rows: the columns it adds, and how a row is made from a clip row.

Nothing here imports torch or transformers: the driver checks the output schema against
MODEL_COLUMNS, and stand-in stages (tests/pipeline/stand_ins.py) keep the row contract, without
loading a model stack (about 9 s of imports per actor on this CPU).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]


@dataclass
class GenResult:
    """One sample's outcome of one generate call (workers.generation)."""

    output_text: str | None = None
    prompt_tokens: int | None = None  # non-pad prompt tokens (attention_mask sum)
    output_tokens: int | None = None  # generated tokens before EOS/pad, EOS excluded
    inputs_ms: float | None = None  # see workers.generation; shared by the call's samples
    prefill_ms: float | None = None
    generate_ms: float | None = None
    peak_memory_bytes: int | None = None
    retention_achieved: float | None = None  # V²Drop layer-averaged visual retention; 1.0 when off
    visual_tokens_per_stage: list[int] = field(default_factory=list)  # before first drop, after each
    flops_full: float | None = None  # analytic LM prefill FLOPs without dropping
    flops_dropped: float | None = None  # ... with this call's drops (== flops_full when off)
    status: str = "ok"
    error: str | None = None
    batch_id: str | None = None  # the generate call that made it (timings above are per call)
    fallback_reason: str | None = None  # set when made by retrying a failed call (workers.model_calls)
    fallback_batch_id: str | None = None  # ... and the id given to that failed call
    # How the call fed the clip's video to the language model (workers.model_calls.plan_call):
    video_prefill_shared: bool | None = None  # True: prefilled once for all the clip's prompts in the call
    video_prefill_unshared_reason: str | None = None  # why generation.share_video_prefix could not share it

    @classmethod
    def failed(cls, error: BaseException) -> GenResult:
        return cls(status="error", error=f"{type(error).__name__}: {error}")


# What a shadow clip adds (workers.shadow): the full-token output and how it agrees with V²Drop's.
SHADOW_COLUMNS = (
    "shadow_output_text",
    "shadow_exact_match",
    "shadow_token_f1",
    "shadow_lcs_ratio",
    "shadow_first_diff_word",
    "shadow_top1_agree",
    "shadow_kl_first_token",
    "shadow_ms",
    "shadow_flops",
)
ERROR_STAGE = "model"
CLIP_LEVEL_PROMPT = ""  # rows about the whole clip (passthrough, unusable frames), not one prompt
DROPPED_INPUT_COLUMNS = ("frames",)
CALL_COLUMNS = tuple(f.name for f in dataclasses.fields(GenResult))  # what a generate call says per item
IDENTITY_COLUMNS = ("model_id", "model_revision", "model_random_weights", "retention_asked", "worker_host")
# Every column the stage adds (pipeline.schema declares their types; pipeline._output checks each is there).
MODEL_COLUMNS = ("prompt", "error_stage", *CALL_COLUMNS, *IDENTITY_COLUMNS, "started_at", "finished_at",
                 *SHADOW_COLUMNS)


def input_columns(row: Mapping[str, Any]) -> Row:
    return {key: value for key, value in row.items() if key not in DROPPED_INPUT_COLUMNS}


def passthrough_row(row: Mapping[str, Any]) -> Row:
    """An upstream error/skip row: its own columns unchanged, the new ones empty. No model saw it,
    so it carries no model values: the same row whether or not a run had a model stage."""
    new_columns = {column: None for column in MODEL_COLUMNS if column not in row}
    out = {**new_columns, **input_columns(row)}
    out["prompt"] = row.get("prompt") or CLIP_LEVEL_PROMPT
    return out


def result_row(row: Mapping[str, Any], prompt: str, result: GenResult, stamp: Mapping[str, Any]) -> Row:
    """One (clip, prompt) row; `started_at` stays the upstream one (decode start) when present."""
    failed = result.status != "ok"
    return {
        **input_columns(row),
        **dict.fromkeys(MODEL_COLUMNS),  # every row of a batch has the same columns
        **dataclasses.asdict(result),
        **stamp,
        "started_at": row.get("started_at") or stamp["started_at"],
        "prompt": prompt,
        "error_stage": ERROR_STAGE if failed else None,
        "visual_tokens_per_stage": result.visual_tokens_per_stage or None,
    }


def utc_now() -> dt.datetime:
    """Timezone-aware UTC datetimes: Arrow stores them as timestamp[us, UTC] (pipeline.schema)."""
    return dt.datetime.now(dt.UTC)


def rows_to_columns(rows: Sequence[Row]) -> dict[str, list]:
    """Row dicts to one list per column (missing keys -> None), columns in first-seen order."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}
