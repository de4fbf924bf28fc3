"""Stage 2, probe (CPU tasks, 1:1): read each video's container metadata.

Columns in: VIDEO_SCHEMA (video_uri, questions, metadata_json).
Columns out (`PROBED_SCHEMA`): those plus duration_s, status ('ok' | 'error'), error, error_stage.
A missing, empty or unreadable file, or one that is no regular file (a FIFO, a device: never
opened, since opening a FIFO blocks), becomes an error row naming it (error_stage 'probe').
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline._discover import VIDEO_SCHEMA
from pipeline._rows import error_fields, extend_schema, to_table
from pipeline.storage import Storage, StorageError
from pipeline.video import VideoError, probe

STATUS_FIELDS = (("status", pa.string()), ("error", pa.string()), ("error_stage", pa.string()))
PROBED_SCHEMA = extend_schema(VIDEO_SCHEMA, ("duration_s", pa.float64()), *STATUS_FIELDS)


def probe_batch(table: pa.Table, *, storage: Storage, cache_dir: str, timeout_s: float) -> pa.Table:
    rows = [probe_row(row, storage, cache_dir, timeout_s) for row in table.to_pylist()]
    return to_table(rows, PROBED_SCHEMA)


def probe_row(row: dict[str, Any], storage: Storage, cache_dir: str, timeout_s: float) -> dict[str, Any]:
    uri = row["video_uri"]
    try:
        info = probe(storage.local_copy(uri, cache_dir), timeout_s=timeout_s)
    except VideoError as e:
        return {**row, **error_fields(uri, e.reason, "probe")}
    except StorageError as e:
        return {**row, **error_fields(uri, f"{e.reason} ({e.kind})", "probe")}
    return {**row, "duration_s": info.duration_s, "status": "ok"}
