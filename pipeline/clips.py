"""Clip planning: cut a video's timeline into fixed-stride spans with deterministic ids.

Planning is arithmetic on the duration only; no frame is touched here. A two-hour video becomes
a list of a few hundred `ClipSpec`s, and each clip is decoded on its own later
(`pipeline.video.decode_clip`), so memory stays bounded by one clip, never by one video.

Worked example, `duration_s=25, clip_len_s=10, stride_s=10, min_clip_len_s=2`:
    [0, 10) [10, 20) [20, 25)        the last span is truncated to the video end
with `stride_s=5` (overlap of 5 s):
    [0, 10) [5, 15) [10, 20) [15, 25) planning stops at the first span that reaches the end,
                                      because every later span would lie inside it
with `min_clip_len_s=6` and `stride_s=10`: [20, 25) is 5 s long and dropped.
`min_clip_len_s` only drops the TAIL of a longer video: a video shorter than it (a 1 s phone
clip) is one clip covering all of it, `duration_s=1` -> [0, 1). Only a video of no duration has
no clips.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

# Fixed forever: clip ids are resume keys, so changing this re-runs every finished clip.
CLIP_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/v2drop-batch/clip")

# Span bounds are rounded to this many decimals so that 3 * 0.1 gives 0.3, not 0.30000000000000004.
_TIME_DECIMALS = 6


@dataclass(frozen=True)
class ClipSpec:
    clip_id: str  # uuid5 of (video uri, start, end, settings that change results); the resume key
    clip_index: int  # 0-based position of this clip within its video
    start_s: float  # span start in seconds from the video start (inclusive)
    end_s: float  # span end in seconds (exclusive)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def clip_id(video_uri: str, start_s: float, end_s: float, settings_key: str = "") -> str:
    """Deterministic id: the same video, span and settings always give the same id."""
    return str(uuid.uuid5(CLIP_ID_NAMESPACE, f"{video_uri}|{start_s:.3f}|{end_s:.3f}|{settings_key}"))


def iter_clips(
    video_uri: str,
    duration_s: float,
    *,
    clip_len_s: float,
    stride_s: float,
    min_clip_len_s: float,
    max_clips: int | None = None,
    settings_key: str = "",
) -> Iterator[ClipSpec]:
    """Yield the clips of one video lazily; see the module docstring for the rules."""
    _check_plan_args(duration_s, clip_len_s, stride_s, min_clip_len_s, max_clips)
    for index in itertools.count():
        if max_clips is not None and index >= max_clips:
            return
        start_s = round(index * stride_s, _TIME_DECIMALS)  # multiply, never accumulate rounding
        if start_s >= duration_s:
            return
        end_s = round(min(start_s + clip_len_s, duration_s), _TIME_DECIMALS)
        if end_s <= start_s:
            return  # a duration below the rounding (1e-7 s): no span to sample
        if index > 0 and round(end_s - start_s, _TIME_DECIMALS) < min_clip_len_s:
            return  # a short tail; later spans are only shorter
        yield ClipSpec(clip_id(video_uri, start_s, end_s, settings_key), index, start_s, end_s)
        if end_s >= duration_s:
            return  # reached the end: any later span would be a sub-span of this one


def plan_clips(video_uri: str, duration_s: float, **settings) -> list[ClipSpec]:
    """All clips of one video (same keyword settings as `iter_clips`); [] only for a video of no
    duration."""
    return list(iter_clips(video_uri, duration_s, **settings))


def _check_plan_args(
    duration_s: float, clip_len_s: float, stride_s: float, min_clip_len_s: float, max_clips: int | None
) -> None:
    if not (math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s!r}")
    if not (math.isfinite(clip_len_s) and clip_len_s > 0):
        raise ValueError(f"clip_len_s must be a finite number > 0, got {clip_len_s!r}")
    if not (math.isfinite(stride_s) and stride_s > 0):
        raise ValueError(f"stride_s must be a finite number > 0, got {stride_s!r}")
    if not (0 <= min_clip_len_s <= clip_len_s):
        raise ValueError(f"min_clip_len_s must be in [0, clip_len_s={clip_len_s}], got {min_clip_len_s!r}")
    is_count = isinstance(max_clips, int) and not isinstance(max_clips, bool)
    if max_clips is not None and not (is_count and max_clips >= 1):
        raise ValueError(f"max_clips must be None or an int >= 1, got {max_clips!r}")
