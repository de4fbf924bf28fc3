"""Stage 1, discover (driver): the job's input as one row per video (1:1 with inputs).

Columns out (`VIDEO_SCHEMA`): video_uri, questions (list<str>, manifest only), metadata_json
(the manifest's other columns as a JSON object of strings; '{}' for folder inputs).
A manifest row naming a missing file is kept: the probe stage turns it into an error row.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline._rows import to_table
from pipeline.config import InputConfig
from pipeline.storage import Storage

VIDEO_SCHEMA = pa.schema(
    [("video_uri", pa.string()), ("questions", pa.list_(pa.string())), ("metadata_json", pa.string())]
)


def discover(cfg: InputConfig, storage: Storage) -> pa.Table:
    """Sorted, de-duplicated videos of the input, at most `cfg.limit` of them."""
    return videos_table(list_videos(cfg, storage))


def list_videos(cfg: InputConfig, storage: Storage) -> list[dict[str, Any]]:
    """The rows of `discover` as dicts: cheap to check for emptiness before pyarrow builds a table
    (building the first table imports pandas, a second or more of a preflight that should fail fast)."""
    records = storage.read_manifest(cfg.uri) if cfg.is_manifest else [{"uri": u} for u in storage.list_videos(cfg.uri, cfg.extensions)]
    rows = {}
    for record in records:
        rows.setdefault(record["uri"], video_row(record))  # a repeated uri would repeat its keys
    return [rows[uri] for uri in sorted(rows)][: cfg.limit]


def videos_table(rows: list[dict[str, Any]]) -> pa.Table:
    return to_table(rows, VIDEO_SCHEMA)


def video_row(record: dict[str, Any]) -> dict[str, Any]:
    metadata = {k: str(v) for k, v in record.items() if k not in ("uri", "questions")}
    return {"video_uri": record["uri"], "questions": list(record.get("questions") or []),
            "metadata_json": json.dumps(metadata, sort_keys=True)}
