"""Stage 4, decode (CPU tasks, 1:1): sample each clip's frames as Arrow-friendly bytes.

Columns in: CLIP_SCHEMA.
Columns out (`DECODED_SCHEMA`): those plus frames (bytes, uint8 [T, H, W, 3] C order),
frames_shape, frames_dtype, timestamps_s, decoder ('decord' | 'pyav'), decode_ms.
Rows that are not 'ok' pass through. A decode failure, a timeout, or a clip whose frames stop
before its end (damaged or cut-short file) becomes an error row (error_stage 'decode'): a caption
of half a clip would claim to describe the whole span.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from pipeline._rows import error_fields, extend_schema, to_table
from pipeline._shard import CLIP_SCHEMA
from pipeline.config import DecodeConfig
from pipeline.storage import Storage, StorageError
from pipeline.video import VideoError, decode_clip, frames_to_record

DECODED_SCHEMA = extend_schema(
    CLIP_SCHEMA,
    ("frames", pa.large_binary()),
    ("frames_shape", pa.list_(pa.int32())),
    ("frames_dtype", pa.string()),
    ("timestamps_s", pa.list_(pa.float64())),
    ("decoder", pa.string()),
    ("decode_ms", pa.float64()),
)


def decode_batch(table: pa.Table, *, decode: DecodeConfig, storage: Storage, cache_dir: str) -> pa.Table:
    return to_table([decode_row(row, decode, storage, cache_dir) for row in table.to_pylist()], DECODED_SCHEMA)


def decode_row(row: dict[str, Any], decode: DecodeConfig, storage: Storage, cache_dir: str) -> dict[str, Any]:
    if row["status"] != "ok":
        return row
    uri, started = row["video_uri"], time.perf_counter()
    try:
        clip = decode_clip(storage.local_copy(uri, cache_dir), row["start_s"], row["end_s"], num_frames=decode.num_frames,
                           fps=decode.fps, max_pixels=decode.max_pixels, timeout_s=decode.timeout_s)
    except VideoError as e:
        return {**row, **error_fields(uri, f"clip [{row['start_s']:g}, {row['end_s']:g}) s: {e.reason}", "decode")}
    except StorageError as e:
        return {**row, **error_fields(uri, f"{e.reason} ({e.kind})", "decode")}
    decode_ms = (time.perf_counter() - started) * 1e3
    if clip.partial:
        reason = f"clip [{row['start_s']:g}, {row['end_s']:g}) s: only {len(clip.timestamps_s)} frames readable ({clip.error})"
        return {**row, **error_fields(uri, reason, "decode"), "decoder": clip.decoder, "decode_ms": decode_ms}
    record = frames_to_record(clip)
    return {**row, **{k: record[k] for k in ("frames", "frames_shape", "frames_dtype", "timestamps_s", "decoder")},
            "decode_ms": decode_ms}
