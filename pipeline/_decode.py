"""Stage 4, decode (CPU tasks, 1:1): sample each clip's frames as Arrow-friendly bytes.

Columns in: CLIP_SCHEMA.
Columns out (`DECODED_SCHEMA`): those plus frames (bytes, uint8 [T, H, W, 3] C order),
frames_shape, frames_dtype, timestamps_s, decoder ('decord' | 'pyav'), decode_ms, last_frame_s,
partial_reason.
Rows that are not 'ok' pass through. A decode failure or a timeout, or any other error while
decoding a clip, becomes an error row naming the file (error_stage 'decode'). A clip whose frames stop before its end (damaged data, a file cut short)
is served with the frames read before that point, and says so: `partial_reason` names the file
and why, and `last_frame_s` shows how far its frames reach, so a caption is never taken to
describe more of the span than the model saw.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from pipeline._rows import error_fields, extend_schema, to_table
from pipeline._shard import CLIP_SCHEMA
from pipeline.config import DecodeConfig
from pipeline.storage import Storage, StorageError
from pipeline.video import DecodedClip, VideoError, decode_clip, frames_to_record

DECODED_SCHEMA = extend_schema(
    CLIP_SCHEMA,
    ("frames", pa.large_binary()),
    ("frames_shape", pa.list_(pa.int32())),
    ("frames_dtype", pa.string()),
    ("timestamps_s", pa.list_(pa.float64())),
    ("decoder", pa.string()),
    ("decode_ms", pa.float64()),
    ("last_frame_s", pa.float64()),
    ("partial_reason", pa.string()),
)


def decode_batch(table: pa.Table, *, decode: DecodeConfig, storage: Storage, cache_dir: str) -> pa.Table:
    return to_table([decode_row(row, decode, storage, cache_dir) for row in table.to_pylist()], DECODED_SCHEMA)


def decode_row(row: dict[str, Any], decode: DecodeConfig, storage: Storage, cache_dir: str) -> dict[str, Any]:
    if row["status"] != "ok":
        return row
    uri, started = row["video_uri"], time.perf_counter()
    try:
        clip = decode_clip(storage.local_copy(uri, cache_dir), row["start_s"], row["end_s"], num_frames=decode.num_frames,
                           fps=decode.fps, max_pixels=decode.max_pixels, timeout_s=decode.timeout_s,
                           threads=max(1, int(decode.num_cpus)),  # the CPUs the task holds
                           reference_frames_only=decode.reference_frames_only)
    except VideoError as e:
        return {**row, **error_fields(uri, f"clip [{row['start_s']:g}, {row['end_s']:g}) s: {e.reason}", "decode")}
    except StorageError as e:
        return {**row, **error_fields(uri, f"{e.reason} ({e.kind})", "decode")}
    except Exception as e:  # noqa: BLE001 - one clip never stops the run; its row names the file and the error
        reason = f"clip [{row['start_s']:g}, {row['end_s']:g}) s: {type(e).__name__}: {e}"
        return {**row, **error_fields(uri, reason, "decode")}
    record = frames_to_record(clip)
    return {**row, **{k: record[k] for k in ("frames", "frames_shape", "frames_dtype", "timestamps_s", "decoder")},
            "decode_ms": (time.perf_counter() - started) * 1e3, "last_frame_s": clip.timestamps_s[-1],
            "partial_reason": _partial_reason(uri, row, clip, decode)}


def _partial_reason(uri: str, row: dict[str, Any], clip: DecodedClip, decode: DecodeConfig) -> str | None:
    if not clip.partial:
        return None
    asked = f" of {decode.num_frames}" if decode.fps is None else ""
    return (f"{uri}: clip [{row['start_s']:g}, {row['end_s']:g}) s: {len(clip.timestamps_s)}{asked} frames "
            f"readable, up to {clip.timestamps_s[-1]:.3f} s ({clip.error})")
