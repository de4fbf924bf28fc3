"""The records and errors of video probing and decoding, shared by the caller and the decoder process.

`VideoError(uri, reason)` is what every probe and decode failure becomes, so it pickles across the
process boundary and always names the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


class VideoError(Exception):
    """A video that cannot be probed or decoded; names the file and says why."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason

    def __reduce__(self):  # rebuild from (uri, reason) when it crosses the process boundary
        return (type(self), (self.uri, self.reason))


class DecodeTimeout(VideoError):
    """The decoder process ran past its time limit and was killed; no fallback can help then."""


@dataclass
class VideoInfo:
    uri: str  # the path that was probed
    duration_s: float  # of the video stream when the container says, else of the container
    fps: float  # average frame rate
    num_frames: int  # stored count, or counted from the packets when the container has none (MKV)
    width: int  # as displayed, i.e. after rotation
    height: int  # as displayed, i.e. after rotation
    codec: str  # FFmpeg codec name, e.g. 'h264', 'hevc', 'av1'; 'unknown' when only decord opened it
    rotation_deg: int  # clockwise degrees the stored frames are turned for display: 0, 90, 180, 270
    container: str  # FFmpeg format name, e.g. 'mov,mp4,m4a,3gp,3g2,mj2', 'matroska,webm'
    size_bytes: int


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB as displayed, H * W <= max_pixels
    timestamps_s: list[float]  # presentation time of each frame, len T
    decoder: str  # 'decord' | 'pyav': the one that produced these frames
    partial: bool = False  # True: damage or an early end of file; T < asked, frames read before it
    error: str | None = None  # why the clip is partial


_DECORD_LOCATION = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")  # '[14:22:48] /src/x.cc:292: '


def short_reason(err: BaseException, limit: int = 300) -> str:
    """One line: decord errors carry C++ source locations and stack traces before the reason."""
    lines = str(err).strip().splitlines()
    text = _DECORD_LOCATION.sub("", lines[0]) if lines else type(err).__name__
    return text[:limit]
