"""Which frames a clip gets: sample times, the nearest decoded frame to each, and the display size.

Pure functions, the same for both decoders. Sample times are the midpoints of `num_frames` equal
bins of [start_s, end_s) (or every 1/fps s starting half a period in), and each sample takes the
frame whose timestamp is nearest among the frames inside [start_s, end_s). Example: [0, 10) with
num_frames=4 samples 1.25, 3.75, 6.25, 8.75 s; at 30 fps these pick the frames at 1.2333 (or
1.2667), ... s.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

# Sample times this far past the last decodable frame are left unserved and the clip is partial;
# a smaller gap is normal (audio or the container outlasting the video by a few frames).
MAX_TAIL_GAP_S = 1.0


def sample_times_s(start_s: float, end_s: float, *, num_frames: int | None, fps: float | None) -> list[float]:
    """Bin midpoints. Example: (0, 10, num_frames=4) -> [1.25, 3.75, 6.25, 8.75];
    (0, 2, fps=2) -> [0.25, 0.75, 1.25, 1.75]."""
    if not (math.isfinite(start_s) and math.isfinite(end_s) and 0 <= start_s < end_s):
        raise ValueError(f"need 0 <= start_s < end_s, got start_s={start_s!r}, end_s={end_s!r}")
    if fps is not None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0 or None, got {fps!r}")
        num_frames = max(1, math.floor((end_s - start_s) * fps))
        step_s = 1.0 / fps
    elif num_frames is None or num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 when fps is None, got {num_frames!r}")
    else:
        step_s = (end_s - start_s) / num_frames
    return [start_s + (i + 0.5) * step_s for i in range(num_frames)]


T = TypeVar("T")


def select_nearest(
    frames: Iterable[tuple[float, T]],
    times_s: list[float],
    start_s: float,
    end_s: float,
    max_tail_gap_s: float = MAX_TAIL_GAP_S,
) -> Iterator[tuple[float, T]]:
    """Stream (timestamp, frame) in time order; yield the frame nearest to each of the sorted
    `times_s`, one per time, among frames inside [start_s, end_s). Stops consuming `frames` as
    soon as every time is served, so a decoder feeding it stops decoding there too. Times more
    than `max_tail_gap_s` after the last frame get nothing: the file ends early or is cut short.
    Example: frames at 0, 1, 2, 3 s, times [0.4, 0.6, 2.9, 3.5, 9] -> frames 0, 1, 3, 3."""
    pending = collections.deque(times_s)
    previous: tuple[float, T] | None = None
    for stamp_s, frame in frames:
        if stamp_s < start_s:
            continue
        if stamp_s >= end_s:
            break
        while pending and pending[0] <= stamp_s:
            t = pending.popleft()
            nearer_previous = previous is not None and t - previous[0] <= stamp_s - t
            yield previous if nearer_previous else (stamp_s, frame)  # type: ignore[misc]
        if not pending:
            return
        previous = (stamp_s, frame)
    for t in pending if previous is not None else ():
        if t - previous[0] > max_tail_gap_s:
            return
        yield previous  # a short tail (container longer than its video) takes the last frame


def fit_to_max_pixels(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """Largest (h, w) with the same aspect and h * w <= max_pixels; never upscales.
    Example: (720, 1280, 448*448) -> (336, 597)."""
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    h, w = max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
    while h * w > max_pixels:  # floor of a float product can still land one row over
        h, w = (h - 1, w) if h >= w else (h, w - 1)
    return h, w


def display_frame(frame: np.ndarray, rotation_deg: int, max_pixels: int) -> np.ndarray:
    """Stored RGB frame -> as displayed: undo the rotation tag, then shrink to max_pixels."""
    if rotation_deg:
        frame = np.rot90(frame, k=-(rotation_deg // 90))  # np.rot90 turns counter-clockwise
    h, w = fit_to_max_pixels(frame.shape[0], frame.shape[1], max_pixels)
    if (h, w) != frame.shape[:2]:
        return shrink(frame, h, w)
    return np.ascontiguousarray(frame)


def shrink(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """An RGB uint8 frame [H, W, 3] resized to [height, width, 3] by antialiased bilinear
    interpolation: the filter of PIL's BILINEAR resize when shrinking (the same pixels within one
    level), by torch's uint8 kernel, which reads the frame in place: 2.7-4.2x faster than PIL's
    (image copy and resize) for 720p-1080p frames (bench/results/decode-cpu.md). It runs in the
    decoder process on one thread (`_serve_fd`)."""
    import torch
    import torch.nn.functional as F

    pixels = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0)  # channels-last view
    out = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())
