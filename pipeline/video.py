"""Probe videos and decode clips on CPU, in a child process that can be timed out and killed.

Public API:
    probe(path, timeout_s=30) -> VideoInfo
    decode_clip(path, start_s, end_s, num_frames=16 | fps=..., max_pixels, timeout_s, threads,
                reference_frames_only) -> DecodedClip
    frames_to_record(clip) -> dict;  frames_from_record(record) -> DecodedClip   (Arrow transport)
Errors are `VideoError(uri, reason)`.

Where the rest lives: the records and errors in `pipeline.video_types`, which frames a clip gets
(sample times, nearest frame, display size) in `pipeline.frame_sampling`, the decord and PyAV work
in `pipeline.decoders`, and the killable helper process it runs in in `pipeline.decoder_process`
(why a child process: decord's native loop holds the GIL and can spin forever).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.decoder_process import DecoderProcess, shared_decoder_process, timed_out_reason
from pipeline.decoders import DECODE_FUNCTIONS, DECODERS, probe_file
from pipeline.frame_sampling import sample_times_s
from pipeline.video_types import DecodedClip, DecodeTimeout, VideoError, VideoInfo

__all__ = ["DecodeTimeout", "DecodedClip", "DecoderProcess", "VideoError", "VideoInfo", "decode_clip",
           "frames_from_record", "frames_to_record", "probe"]


def probe(path: str, *, timeout_s: float = 30, process: DecoderProcess | None = None) -> VideoInfo:
    """Container metadata of `path` (PyAV; decord when PyAV cannot open it)."""
    _check_file(path)
    return (process or shared_decoder_process()).call(probe_file, (path,), uri=path, timeout_s=timeout_s)


def decode_clip(
    path: str,
    start_s: float,
    end_s: float,
    *,
    num_frames: int | None = 16,
    fps: float | None = None,
    max_pixels: int = 448 * 448,
    timeout_s: float = 120,
    decoder: str = "auto",
    threads: int = 1,
    reference_frames_only: bool = False,
    process: DecoderProcess | None = None,
) -> DecodedClip:
    """Frames sampled from [start_s, end_s) of `path`, as displayed and at most `max_pixels` each.

    `fps` (when set) wins over `num_frames`. `decoder='auto'` tries PyAV, then decord when PyAV
    cannot open the file or fails before any frame; 'pyav' or 'decord' forces one. The decoder runs
    `threads` threads. `reference_frames_only`: PyAV skips the frames no other frame refers to, and
    each sample takes the nearest decoded one (decord cannot skip). `timeout_s` bounds the whole
    call, fallback included.
    """
    _check_file(path)
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    times_s = sample_times_s(start_s, end_s, num_frames=num_frames, fps=fps)
    worker = process or shared_decoder_process()
    deadline = time.monotonic() + timeout_s
    failures = []
    for name in _decoder_order(decoder):
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:  # an earlier decoder failed slowly and used up the budget
            failures.append(timed_out_reason(timeout_s))
            break
        try:
            args = (path, start_s, end_s, times_s, max_pixels, threads, reference_frames_only)
            return worker.call(DECODE_FUNCTIONS[name], args, uri=path, timeout_s=remaining_s)
        except DecodeTimeout:  # report the caller's limit, not what was left of it for this attempt
            raise DecodeTimeout(path, timed_out_reason(timeout_s)) from None
        except VideoError as err:
            failures.append(f"{name}: {err.reason}")
    raise VideoError(path, "; ".join(failures))


def frames_to_record(clip: DecodedClip) -> dict[str, Any]:
    """Arrow-friendly columns: raw bytes plus shape and dtype, no pickles."""
    return {
        "frames": clip.frames.tobytes(),
        "frames_shape": list(clip.frames.shape),
        "frames_dtype": str(clip.frames.dtype),
        "timestamps_s": list(clip.timestamps_s),
        "decoder": clip.decoder,
        "partial": clip.partial,
        "error": clip.error,
    }


def frames_from_record(record: dict[str, Any]) -> DecodedClip:
    shape = tuple(int(n) for n in record["frames_shape"])  # Arrow may hand back a numpy array
    frames = np.frombuffer(record["frames"], dtype=np.dtype(record["frames_dtype"])).reshape(shape)
    return DecodedClip(
        frames=frames,
        timestamps_s=[float(t) for t in record["timestamps_s"]],
        decoder=record["decoder"],
        partial=bool(record.get("partial", False)),
        error=record.get("error"),
    )


def _check_file(path: str) -> None:
    """Cheap checks in the caller, so the common failures need no child process."""
    p = Path(path)
    if not p.exists():
        raise VideoError(path, "no such file")
    if not p.is_file():
        raise VideoError(path, "not a regular file")
    if p.stat().st_size == 0:
        raise VideoError(path, "file is empty (0 bytes)")


def _decoder_order(decoder: str) -> tuple[str, ...]:
    if decoder == "auto":
        return DECODERS
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be 'auto' or one of {DECODERS}, got {decoder!r}")
    return (decoder,)
