"""Stage 3, shard (CPU tasks, 1:N): one row per clip to run, via `pipeline.clips.plan_clips`.

Columns in: PROBED_SCHEMA.
Columns out (`CLIP_SCHEMA`): those plus clip_index, start_s, end_s, clip_id.

- a probed video -> one row per clip whose (clip_id, prompt) keys are not all finished (resume);
- a video shorter than clips.min_clip_len_s -> one clip covering all of it (the decoder repeats
  frames up to decode.num_frames);
- a readable video of no duration -> one 'skipped' row (`skip_reason` says why; error stays null);
- a probe error -> its one error row, with a video-level clip_id so the row has a key; so are
  probed figures the clip plan refuses (error_stage 'probe', `planned_or_error`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pyarrow as pa

from pipeline._probe import PROBED_SCHEMA
from pipeline._rows import error_fields, extend_schema, to_table
from pipeline.clips import clip_id, plan_clips
from pipeline.config import ClipsConfig, JobConfig, PromptConfig
from workers.model_inputs import prompts_for_row

CLIP_SCHEMA = extend_schema(
    PROBED_SCHEMA, ("clip_index", pa.int32()), ("start_s", pa.float64()), ("end_s", pa.float64()), ("clip_id", pa.string()),
    ("skip_reason", pa.string()),
)


def settings_key(cfg: JobConfig) -> str:
    """Settings that change what the model sees of a clip; part of every clip_id. Example:
    'frames=16|fps=None|px=200704'. What changes the output for the same frames (model, retention,
    sampling, system prompt) is in the rows' engine fingerprint instead (workers.provenance): a
    re-run with other settings replaces the clip's rows rather than adding rows under new ids.
    `decode.reference_frames_only` moves samples to reference frames: '|reference-frames' when on,
    so the keys of runs without it stay what they were."""
    d = cfg.decode
    return f"frames={d.num_frames}|fps={d.fps}|px={d.max_pixels}" + ("|reference-frames" if d.reference_frames_only else "")


def key(clip: str, prompt: str | None) -> tuple[str, str]:
    """The resume key of a row; video- and clip-level rows (prompt null) use ''."""
    return (clip, prompt or "")


def video_clip_id(uri: str, settings: str) -> str:
    """The clip_id of a video-level row (a probe error): the span [0, 0)."""
    return clip_id(uri, 0.0, 0.0, settings)


def shard_batch(
    table: pa.Table, *, clips: ClipsConfig, settings: str, prompt_cfg: PromptConfig, done: Collection[tuple[str, str]]
) -> pa.Table:
    rows = [clip for row in table.to_pylist() for clip in planned_or_error(row, clips, settings, prompt_cfg, done)]
    return to_table(rows, CLIP_SCHEMA)


def planned_or_error(
    row: dict[str, Any], clips: ClipsConfig, settings: str, prompt_cfg: PromptConfig, done: Collection[tuple[str, str]]
) -> list[dict[str, Any]]:
    """shard_row, or the video's one error row when its probed figures cannot be planned: one
    video never stops the run (and a re-run would plan it again)."""
    try:
        return shard_row(row, clips, settings, prompt_cfg, done)
    except Exception as e:  # noqa: BLE001 - named in the row; the other videos go on
        uri = row["video_uri"]
        reason = f"the probe's figures cannot be planned into clips ({type(e).__name__}: {e})"
        return [{**row, "clip_id": video_clip_id(uri, settings), **error_fields(uri, reason, "probe")}]


def shard_row(
    row: dict[str, Any], clips: ClipsConfig, settings: str, prompt_cfg: PromptConfig, done: Collection[tuple[str, str]]
) -> list[dict[str, Any]]:
    uri = row["video_uri"]
    if row["status"] != "ok":
        return [{**row, "clip_id": video_clip_id(uri, settings)}]
    planned = plan_clips(uri, row["duration_s"], clip_len_s=clips.clip_len_s, stride_s=clips.stride_s,
                         min_clip_len_s=clips.min_clip_len_s, max_clips=clips.max_clips_per_video, settings_key=settings)
    if not planned:
        return [r for r in [skipped_row(row, clips, settings)] if key(r["clip_id"], None) not in done]
    prompts = prompts_for_row(row, prompt_cfg)
    return [
        {**row, "clip_index": c.clip_index, "start_s": c.start_s, "end_s": c.end_s, "clip_id": c.clip_id}
        for c in planned
        if not all(key(c.clip_id, p) in done for p in prompts)
    ]


def skipped_row(row: dict[str, Any], clips: ClipsConfig, settings: str) -> dict[str, Any]:
    uri, duration_s = row["video_uri"], row["duration_s"]
    reason = f"{uri}: the container opens but reports a duration of {duration_s:g} s: nothing to caption"
    return {**row, "status": "skipped", "skip_reason": reason, "start_s": 0.0,
            "end_s": duration_s, "clip_id": clip_id(uri, 0.0, duration_s, settings)}
