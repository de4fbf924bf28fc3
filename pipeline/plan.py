"""`python -m pipeline JOB.yaml --dry-run`: validate, discover, probe, then print the plan.

No Ray, no model load, nothing written: the config is checked (exit 2 naming the key), the
inputs listed, each video probed on this machine (a few threads; s3:// videos are copied to
the node-local cache as a real run would), and the clips planned with the job's clip settings.
Resume is not consulted (that needs the output's lease): the plan is the whole input.

Visual tokens are estimated with Qwen-VL's patching (one token per 28 x 28 pixels of a frame
resized within decode.max_pixels, one temporal patch per 2 frames): exact for Qwen2.5-VL, a
close estimate for the other families. GPU-hours divide the video-hours by the video-hours per
GPU-hour of the newest GPU run in this output's summaries, else
`run.expected_video_hours_per_gpu_hour`; with neither they are not estimated.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.clips import plan_clips
from pipeline.config import JobConfig
from pipeline.storage import Storage, StorageError

TOKEN_SIDE_PX = 28  # Qwen-VL: 14 px patches merged 2 x 2
FRAMES_PER_TEMPORAL_PATCH = 2
PROBE_THREADS = 4


@dataclass
class VideoPlan:
    uri: str
    duration_s: float | None  # None: the probe failed (`error` says why); the run writes an error row
    width: int = 0
    height: int = 0
    clips: int = 0
    clip_seconds: float = 0.0
    visual_tokens: int = 0  # before dropping, all clips
    error: str | None = None


def visual_tokens_per_clip(width: int, height: int, num_frames: int, max_pixels: int) -> int:
    """Example: 1280x720, 16 frames, max_pixels 448*448 -> resized ~588x336 -> 21 x 12 tokens per
    temporal patch x 8 patches = 2016."""
    scale = min(1.0, math.sqrt(max_pixels / max(width * height, 1)))
    side = lambda px: max(1, round(px * scale / TOKEN_SIDE_PX))  # noqa: E731
    return side(width) * side(height) * math.ceil(num_frames / FRAMES_PER_TEMPORAL_PATCH)


def frames_per_clip(cfg: JobConfig, clip_s: float) -> int:
    return cfg.decode.num_frames if cfg.decode.fps is None else max(1, round(cfg.decode.fps * clip_s))


def plan_video(cfg: JobConfig, storage: Storage, uri: str, cache_dir: str) -> VideoPlan:
    from pipeline.video import VideoError, probe

    try:
        info = probe(storage.local_copy(uri, cache_dir), timeout_s=cfg.decode.timeout_s)
    except (VideoError, StorageError) as e:
        return VideoPlan(uri, None, error=str(getattr(e, "reason", e)))
    clips = plan_clips(uri, info.duration_s, clip_len_s=cfg.clips.clip_len_s, stride_s=cfg.clips.stride_s,
                       min_clip_len_s=cfg.clips.min_clip_len_s, max_clips=cfg.clips.max_clips_per_video)
    tokens = sum(visual_tokens_per_clip(info.width, info.height, frames_per_clip(cfg, c.duration_s), cfg.decode.max_pixels)
                 for c in clips)
    return VideoPlan(uri, info.duration_s, info.width, info.height, len(clips), sum(c.duration_s for c in clips), tokens)


def make_plan(cfg: JobConfig, storage: Storage, videos: list[dict[str, Any]], cache_dir: str) -> list[VideoPlan]:
    with ThreadPoolExecutor(PROBE_THREADS) as pool:
        return list(pool.map(lambda v: plan_video(cfg, storage, v["video_uri"], cache_dir), videos))


def video_hours_per_gpu_hour(cfg: JobConfig, storage: Storage) -> tuple[float | None, str]:
    """The rate the estimate uses and where it came from."""
    from pipeline.show import read_summaries

    try:
        summaries = read_summaries(storage, cfg.output.uri, cfg.job)
    except StorageError:
        summaries = []
    measured = [s for s in summaries if s.get("video_hours_per_gpu_hour")]
    if measured:
        newest = max(measured, key=lambda s: s["finished_at"])
        return newest["video_hours_per_gpu_hour"], f"measured by run {newest['run_id']}"
    if cfg.run.expected_video_hours_per_gpu_hour:
        return cfg.run.expected_video_hours_per_gpu_hour, "run.expected_video_hours_per_gpu_hour"
    return None, "no GPU run in this output yet; set run.expected_video_hours_per_gpu_hour"


def format_plan(cfg: JobConfig, plans: list[VideoPlan], rate: tuple[float | None, str]) -> str:
    readable = [p for p in plans if p.duration_s is not None]
    clips = sum(p.clips for p in plans)
    video_h = sum(p.clip_seconds for p in plans) / 3600
    tokens = sum(p.visual_tokens for p in plans)
    prompts = max(1, len(cfg.prompt.questions)) if cfg.prompt.task == "qa" else 1
    per_hour, source = rate
    gpu_hours = video_h / per_hour if per_hour else None
    lines = [
        f"dry run of job {cfg.job!r} (nothing started, nothing written; resume not consulted)",
        f"  videos           {len(plans)} ({len(plans) - len(readable)} unreadable: error rows)",
        f"  clips            {clips} ({cfg.clips.clip_len_s:g} s, stride {cfg.clips.stride_s:g} s), "
        f"{clips * prompts} model rows ({cfg.prompt.task})",
        f"  video            {video_h * 3600:.1f} s = {video_h:.4f} h",
        f"  visual tokens    {tokens:,} before dropping, ~{round(tokens * cfg.model.retention):,} kept on average "
        f"at retention {cfg.model.retention:g} (Qwen-VL patching estimate)",
    ]
    if gpu_hours is None:
        lines.append(f"  GPU-hours, cost  not estimated: {source}")
    else:
        lines.append(f"  GPU-hours        {gpu_hours:.4f} at {per_hour:.4g} video-h per GPU-h ({source})")
        lines.append(f"  cost             ${gpu_hours * cfg.run.gpu_hourly_usd:.2f} at run.gpu_hourly_usd={cfg.run.gpu_hourly_usd:g}")
    lines.append("  per video:")
    for p in plans:
        what = (f"{p.duration_s:.1f} s {p.width}x{p.height}, {p.clips} clips, {p.visual_tokens:,} visual tokens"
                if p.duration_s is not None else f"unreadable: {p.error}")
        lines.append(f"    {p.uri}  {what}")
    return "\n".join(lines)


def dry_run(cfg: JobConfig, storage: Storage) -> str:
    """The plan as printed text; raises ConfigError (exit 2) on a bad input or model source."""
    from pipeline.config import check_local_input
    from pipeline.preflight import check_model_source, discover_inputs
    from pipeline.run import VIDEO_CACHE_SUBDIR
    from workers.settings import default_cache_dir

    check_local_input(cfg)
    check_model_source(cfg, storage)
    videos = discover_inputs(cfg, storage)
    cache_dir = str(default_cache_dir(cfg.model.cache_dir) / VIDEO_CACHE_SUBDIR)
    return format_plan(cfg, make_plan(cfg, storage, videos, cache_dir), video_hours_per_gpu_hour(cfg, storage))
