"""The work done inside the decoder process: probing a file and decoding a clip's frames.

Why two decoders: PyAV decodes sequentially, so it can return the frames before a damaged region
(`partial=True`), and it takes the least CPU time per clip (bench/results/decode-cpu.md); decord
(the `decord2` distribution: maintained, FFmpeg 8, AV1), tried when PyAV fails, gives up on the
first damaged packet but may open a file PyAV cannot. decord applies a rotation tag and PyAV does
not; frames from either come back as displayed (rotated), so the two are interchangeable.

Each decodes on `threads` threads, the CPUs its decode task holds (`decode.num_cpus`, 1 by
default): more threads shorten a clip's wall time but cost CPU time of their own, and Ray already
runs one decode task per CPU.

These functions run in `pipeline.decoder_process`'s child (they may hang in native code); call
them through `pipeline.video`, never directly in a worker.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import numpy as np

from pipeline.frame_sampling import display_frame, select_nearest
from pipeline.video_types import DecodedClip, VideoError, VideoInfo, short_reason

DECODERS = ("pyav", "decord")  # the order `decoder='auto'` tries them in


def probe_file(path: str) -> VideoInfo:
    try:
        info = _probe_pyav(path)
    except Exception as av_err:  # PyAV could not open it: decord may (its own FFmpeg build)
        try:
            info = probe_decord(path)
        except Exception as decord_err:
            raise VideoError(path, f"not a readable video (pyav: {av_err}; decord: {decord_err})") from None
    return dataclasses.replace(info, duration_s=plausible_duration(info))


def plausible_duration(info: VideoInfo) -> float:
    """The header's duration, unless a damaged header says what the frames cannot be: negative,
    not finite, or more than twice their span (+1 s). Then the frames' span, num_frames / fps (as
    decord's probe measures it), when known; else VideoError. A header of 1e9 s would otherwise
    plan 1e8 clips, a negative one fail the clip plan."""
    duration_s, span_s = info.duration_s, info.num_frames / info.fps if info.fps > 0 else None
    if math.isfinite(duration_s) and duration_s >= 0 and (span_s is None or duration_s <= 2 * span_s + 1):
        return duration_s
    if span_s is None:
        raise VideoError(info.uri, f"the container reports an impossible duration ({duration_s!r} s) and no frame rate")
    return span_s


def _probe_pyav(path: str) -> VideoInfo:
    import av

    with av.open(path) as container:
        stream = container.streams.best("video")  # the stream decord also picks (av_find_best_stream)
        if stream is None:
            raise VideoError(path, "no video stream")
        first = next(container.decode(stream))  # rotation lives in the frames' display matrix
        rotation_deg = (-first.rotation) % 360  # PyAV reports it counter-clockwise
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration:
            duration_s = float(stream.duration * stream.time_base)
        else:  # MKV/WebM keep no per-stream duration; theirs runs to the last timestamp, not from the first
            duration_s = (container.duration - max(container.start_time or 0, 0)) / 1e6
        width, height = stream.codec_context.width, stream.codec_context.height
        # canonical_name is the format (av1), name the decoder that reads it (libdav1d)
        codec, container_name = stream.codec_context.codec.canonical_name, container.format.name
    num_frames = stream.frames or _count_packets(path)
    if rotation_deg in (90, 270):
        width, height = height, width
    size_bytes = os.path.getsize(path)
    return VideoInfo(
        path, duration_s, fps, num_frames, width, height, codec, rotation_deg, container_name, size_bytes
    )


def _count_packets(path: str) -> int:
    """Frame count for containers that do not store it (MKV, WebM): demux only, no decoding."""
    import av

    with av.open(path) as container:
        stream = container.streams.best("video")
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def probe_decord(path: str) -> VideoInfo:
    from decord import VideoReader, cpu

    reader = VideoReader(path, ctx=cpu(0))
    height, width = reader[0].shape[:2]  # decord has already applied the rotation
    num_frames, fps = len(reader), float(reader.get_avg_fps())
    duration_s = num_frames / fps if fps else 0.0
    size_bytes = os.path.getsize(path)
    return VideoInfo(path, duration_s, fps, num_frames, width, height, "unknown", 0, "unknown", size_bytes)


def _decode_decord(
    path: str, start_s: float, end_s: float, times_s: list[float], max_pixels: int, threads: int = 1,
    reference_frames_only: bool = False,  # decord has no way to skip frames: every one is decoded
) -> DecodedClip:
    from decord import VideoReader, cpu

    try:
        reader = VideoReader(path, ctx=cpu(0), num_threads=threads)
        starts_s = reader.get_frame_timestamp(range(len(reader)))[:, 0].tolist()  # from the index
        chosen = list(select_nearest(zip(starts_s, range(len(starts_s))), times_s, start_s, end_s))
        if not chosen:
            raise VideoError(path, f"no frames in [{start_s:g}, {end_s:g}) s")
        unique = sorted({index for _, index in chosen})
        batch = reader.get_batch(unique).asnumpy()  # [U, H, W, 3], rotation already applied
    except VideoError:
        raise
    except Exception as err:
        raise VideoError(path, short_reason(err)) from None
    row = {index: i for i, index in enumerate(unique)}
    frames = np.stack([display_frame(batch[row[index]], 0, max_pixels) for _, index in chosen])
    return _clip(frames, [stamp_s for stamp_s, _ in chosen], "decord", len(times_s), end_s)


def _clip(
    frames: np.ndarray, stamps_s: list[float], decoder: str, num_asked: int, end_s: float
) -> DecodedClip:
    """A clip whose frames ran out before the span did is partial, never padded silently."""
    if len(stamps_s) == num_asked:
        return DecodedClip(frames, stamps_s, decoder)
    ended = f"no frames after {stamps_s[-1]:.3f} s, before the clip end {end_s:g} s"
    ended += ": the file ends early or is cut short"
    return DecodedClip(frames, stamps_s, decoder, partial=True, error=ended)


def _decode_pyav(
    path: str, start_s: float, end_s: float, times_s: list[float], max_pixels: int, threads: int = 1,
    reference_frames_only: bool = False,
) -> DecodedClip:
    import av

    frames: list[np.ndarray] = []
    stamps_s: list[float] = []
    try:
        with av.open(path) as container:
            stream = container.streams.best("video")
            if stream is None:
                raise VideoError(path, "no video stream")
            stream.thread_type = "AUTO" if threads > 1 else "NONE"  # frame threads cost CPU time of their own
            stream.thread_count = threads
            if reference_frames_only:  # FFmpeg's AVDISCARD_NONREF: frames no other frame refers to
                stream.codec_context.skip_frame = "NONREF"
            # times count from the stream's first frame, as the clip plan's and decord's do (a cut
            # file or an MPEG-TS stream starts later than 0)
            offset_s = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            if start_s > 0:  # lands on the keyframe at or before start_s; decoding runs forward
                container.seek(int((start_s + offset_s) / stream.time_base), stream=stream, backward=True)
            decoded = ((f.time - offset_s, f) for f in container.decode(stream) if f.time is not None)
            converted: dict[float, np.ndarray] = {}  # one conversion when a frame serves several times
            for stamp_s, frame in select_nearest(decoded, times_s, start_s, end_s):
                if stamp_s not in converted:
                    rgb = frame.to_ndarray(format="rgb24")  # stored orientation: PyAV ignores the tag
                    converted = {stamp_s: display_frame(rgb, -frame.rotation % 360, max_pixels)}
                frames.append(converted[stamp_s])
                stamps_s.append(stamp_s)
    except VideoError:
        raise
    except Exception as err:
        if not frames:
            raise VideoError(path, short_reason(err)) from None
        return DecodedClip(np.stack(frames), stamps_s, "pyav", partial=True, error=short_reason(err))
    if not frames:
        raise VideoError(path, f"no frames in [{start_s:g}, {end_s:g}) s")
    return _clip(np.stack(frames), stamps_s, "pyav", len(times_s), end_s)


DECODE_FUNCTIONS: dict[str, Callable[..., DecodedClip]] = {"decord": _decode_decord, "pyav": _decode_pyav}
