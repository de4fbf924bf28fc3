"""Probe videos and decode clips on CPU, in a child process that can be timed out and killed.

Public API:
    probe(path, timeout_s=30) -> VideoInfo
    decode_clip(path, start_s, end_s, num_frames=16 | fps=..., max_pixels, timeout_s) -> DecodedClip
    frames_to_record(clip) -> dict;  frames_from_record(record) -> DecodedClip   (Arrow transport)
Errors are `VideoError(uri, reason)`.

Why a child process: decord's native decode loop holds the GIL and can spin forever on a container
that over-reports its frame count, so a thread cannot stop it. Every probe and decode therefore runs
in a helper process (`DecoderProcess`): a fresh interpreter started once and reused; a request that
outlives its timeout gets the process killed (SIGKILL) and the next request starts a new one.

Why two decoders: decord (the `decord2` distribution: maintained, FFmpeg 8, AV1) is fast at random
access but gives up on the first damaged packet. PyAV decodes sequentially, so it can return the
frames before a damaged region (`partial=True`), and it takes over whatever decord cannot open or
turn (decord2 3.4 fails on some tiny rotated frames). decord applies a rotation tag and PyAV does
not; frames from either come back as displayed (rotated), so the two are interchangeable.

Frame choice (same for both decoders): sample times are the midpoints of `num_frames` equal bins of
[start_s, end_s) (or every 1/fps s starting half a period in), and each sample takes the frame whose
timestamp is nearest among the frames inside [start_s, end_s). Example: [0, 10) with num_frames=4
samples 1.25, 3.75, 6.25, 8.75 s; at 30 fps these pick the frames at 1.2333 (or 1.2667), ... s.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

DECODERS = ("decord", "pyav")
# Sample times this far past the last decodable frame are left unserved and the clip is partial;
# a smaller gap is normal (audio or the container outlasting the video by a few frames).
MAX_TAIL_GAP_S = 1.0


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


# ---------------------------------------------------------------- public API (runs in the caller)


def probe(path: str, *, timeout_s: float = 30, process: DecoderProcess | None = None) -> VideoInfo:
    """Container metadata of `path` (PyAV; decord when PyAV cannot open it)."""
    _check_file(path)
    return (process or shared_decoder_process()).call(_probe_file, (path,), uri=path, timeout_s=timeout_s)


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
    process: DecoderProcess | None = None,
) -> DecodedClip:
    """Frames sampled from [start_s, end_s) of `path`, as displayed and at most `max_pixels` each.

    `fps` (when set) wins over `num_frames`. `decoder='auto'` tries decord, then PyAV when decord
    cannot open the file or raises while decoding; 'decord' or 'pyav' forces one. `timeout_s`
    bounds the whole call, fallback included.
    """
    _check_file(path)
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels!r}")
    times_s = sample_times_s(start_s, end_s, num_frames=num_frames, fps=fps)
    worker = process or shared_decoder_process()
    deadline = time.monotonic() + timeout_s
    failures = []
    for name in _decoder_order(decoder):
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:  # an earlier decoder failed slowly and used up the budget
            failures.append(_timed_out(timeout_s))
            break
        try:
            args = (path, start_s, end_s, times_s, max_pixels)
            return worker.call(_DECODE_FUNCTIONS[name], args, uri=path, timeout_s=remaining_s)
        except DecodeTimeout:  # report the caller's limit, not what was left of it for this attempt
            raise DecodeTimeout(path, _timed_out(timeout_s)) from None
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


# ---------------------------------------------------------------- pure helpers


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


def _display(frame: np.ndarray, rotation_deg: int, max_pixels: int) -> np.ndarray:
    """Stored RGB frame -> as displayed: undo the rotation tag, then shrink to max_pixels."""
    if rotation_deg:
        frame = np.rot90(frame, k=-(rotation_deg // 90))  # np.rot90 turns counter-clockwise
    h, w = fit_to_max_pixels(frame.shape[0], frame.shape[1], max_pixels)
    if (h, w) != frame.shape[:2]:
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(frame))
        frame = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR))  # antialiased when shrinking
    return np.ascontiguousarray(frame)


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


# ---------------------------------------------------------------- work done in the child process


def _probe_file(path: str) -> VideoInfo:
    try:
        return _probe_pyav(path)
    except Exception as av_err:  # PyAV could not open it: decord may (its own FFmpeg build)
        try:
            return _probe_decord(path)
        except Exception as decord_err:
            raise VideoError(path, f"not a readable video (pyav: {av_err}; decord: {decord_err})") from None


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
        else:  # MKV/WebM keep no per-stream duration
            duration_s = container.duration / 1e6
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


def _probe_decord(path: str) -> VideoInfo:
    from decord import VideoReader, cpu

    reader = VideoReader(path, ctx=cpu(0))
    height, width = reader[0].shape[:2]  # decord has already applied the rotation
    num_frames, fps = len(reader), float(reader.get_avg_fps())
    duration_s = num_frames / fps if fps else 0.0
    size_bytes = os.path.getsize(path)
    return VideoInfo(path, duration_s, fps, num_frames, width, height, "unknown", 0, "unknown", size_bytes)


def _decode_decord(
    path: str, start_s: float, end_s: float, times_s: list[float], max_pixels: int
) -> DecodedClip:
    from decord import VideoReader, cpu

    try:
        reader = VideoReader(path, ctx=cpu(0))
        starts_s = reader.get_frame_timestamp(range(len(reader)))[:, 0].tolist()  # from the index
        chosen = list(select_nearest(zip(starts_s, range(len(starts_s))), times_s, start_s, end_s))
        if not chosen:
            raise VideoError(path, f"no frames in [{start_s:g}, {end_s:g}) s")
        unique = sorted({index for _, index in chosen})
        batch = reader.get_batch(unique).asnumpy()  # [U, H, W, 3], rotation already applied
    except VideoError:
        raise
    except Exception as err:
        raise VideoError(path, _short(err)) from None
    row = {index: i for i, index in enumerate(unique)}
    frames = np.stack([_display(batch[row[index]], 0, max_pixels) for _, index in chosen])
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
    path: str, start_s: float, end_s: float, times_s: list[float], max_pixels: int
) -> DecodedClip:
    import av

    frames: list[np.ndarray] = []
    stamps_s: list[float] = []
    try:
        with av.open(path) as container:
            stream = container.streams.best("video")
            if stream is None:
                raise VideoError(path, "no video stream")
            stream.thread_type = "AUTO"
            if start_s > 0:  # lands on the keyframe at or before start_s; decoding runs forward
                container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
            decoded = ((f.time, f) for f in container.decode(stream) if f.time is not None)
            converted: dict[float, np.ndarray] = {}  # one conversion when a frame serves several times
            for stamp_s, frame in select_nearest(decoded, times_s, start_s, end_s):
                if stamp_s not in converted:
                    rgb = frame.to_ndarray(format="rgb24")  # stored orientation: PyAV ignores the tag
                    converted = {stamp_s: _display(rgb, -frame.rotation % 360, max_pixels)}
                frames.append(converted[stamp_s])
                stamps_s.append(stamp_s)
    except VideoError:
        raise
    except Exception as err:
        if not frames:
            raise VideoError(path, _short(err)) from None
        return DecodedClip(np.stack(frames), stamps_s, "pyav", partial=True, error=_short(err))
    if not frames:
        raise VideoError(path, f"no frames in [{start_s:g}, {end_s:g}) s")
    return _clip(np.stack(frames), stamps_s, "pyav", len(times_s), end_s)


_DECODE_FUNCTIONS: dict[str, Callable[..., DecodedClip]] = {"decord": _decode_decord, "pyav": _decode_pyav}


_DECORD_LOCATION = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")  # '[14:22:48] /src/x.cc:292: '


def _timed_out(timeout_s: float) -> str:
    return f"decoding timed out after {timeout_s:g} s; the decoder process was killed"


def _short(err: BaseException, limit: int = 300) -> str:
    """One line: decord errors carry C++ source locations and stack traces before the reason."""
    lines = str(err).strip().splitlines()
    text = _DECORD_LOCATION.sub("", lines[0]) if lines else type(err).__name__
    return text[:limit]


# ---------------------------------------------------------------- the helper process


class DecoderProcess:
    """One warm helper process that runs decode requests and is killed when one overruns.

    Thread-safe (one request at a time). It is replaced every `max_requests` requests because
    decord leaks memory on repeated reads.
    """

    def __init__(self, *, max_requests: int = 500, startup_timeout_s: float = 60) -> None:
        self.max_requests = max_requests
        self.startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._served = 0

    def call(self, fn: Callable[..., T], args: tuple, *, uri: str, timeout_s: float) -> T:
        """Run module-level `fn(*args)` in the helper; kill it after `timeout_s` (startup excluded)."""
        with self._lock:
            conn = self._ensure_started(uri)
            conn.send((fn, args, uri))
            if not conn.poll(timeout_s):
                self._kill()
                raise DecodeTimeout(uri, _timed_out(timeout_s))
            try:
                ok, value = conn.recv()
            except (EOFError, OSError):
                code = self._exit_code()
                self._kill()
                raise VideoError(uri, f"the decoder process died (exit code {code})") from None
            self._served += 1
            if self._served >= self.max_requests:
                self._kill()
        if ok:
            return value
        raise value

    def close(self) -> None:
        with self._lock:
            self._kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _ensure_started(self, uri: str) -> Connection:
        if self._proc is not None and self._proc.poll() is None:
            return self._conn
        self._kill()
        # A fresh interpreter that imports only this module: unlike multiprocessing's 'spawn' it
        # never re-imports the caller's __main__ (a Ray worker, a notebook, stdin, or a driver
        # that imports torch), so it starts in ~0.3 s and works wherever the caller runs.
        parent_sock, child_sock = socket.socketpair()
        for sock in (parent_sock, child_sock):  # a clip is megabytes: move it in few large writes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER_BYTES)
        with parent_sock, child_sock:
            python_path = os.pathsep.join([_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),),
                env={**os.environ, "PYTHONPATH": python_path},
            )
            self._conn, self._served = Connection(os.dup(parent_sock.fileno())), 0
        if not self._conn.poll(self.startup_timeout_s):
            self._kill()
            raise VideoError(uri, f"the decoder process did not start within {self.startup_timeout_s:g} s")
        try:
            self._conn.recv()  # the 'ready' message
        except (EOFError, OSError):
            code = self._exit_code()
            self._kill()
            raise VideoError(uri, f"the decoder process failed to start (exit code {code})") from None
        return self._conn

    def _exit_code(self) -> int | None:
        """The code of a helper that closed its pipe: it is exiting, give it a moment to finish."""
        try:
            return self._proc.wait(timeout=5) if self._proc is not None else None
        except subprocess.TimeoutExpired:
            return None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()  # SIGKILL: a native loop holding the GIL ignores everything else
            self._proc.wait(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None


_SOCKET_BUFFER_BYTES = 4 << 20  # the kernel caps this at net.core.wmem_max / rmem_max
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
_CHILD_MAIN = "import sys; from pipeline.video import _serve_fd; _serve_fd(int(sys.argv[1]))"


def _serve_fd(fd: int) -> None:
    """Child main loop: run (fn, args) requests until the parent closes its end."""
    conn = Connection(fd)
    for module in ("av", "decord", "PIL.Image"):  # import now so the first request is not slower
        try:
            __import__(module)
        except ImportError:
            pass
    conn.send("ready")
    while True:
        try:
            fn, args, uri = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((True, fn(*args)))
        except VideoError as err:
            conn.send((False, err))
        except Exception as err:  # anything else becomes a VideoError so it pickles and names the file
            conn.send((False, VideoError(uri, f"{type(err).__name__}: {_short(err)}")))


@functools.cache
def _process_for(pid: int) -> DecoderProcess:
    return DecoderProcess()


def shared_decoder_process() -> DecoderProcess:
    """The helper of this process, started on first use. Keyed by pid so a forked child never
    talks to its parent's helper."""
    return _process_for(os.getpid())
