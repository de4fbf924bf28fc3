"""Stage 5, model (GPU actor pool, 1:N): caption or answer questions about each clip.

Columns in: DECODED_SCHEMA. Columns out: `pipeline.schema.FILE_SCHEMA`, one row per
(clip, prompt): caption -> 1 row per clip, qa -> one per question. A row that is already
'error' or 'skipped' passes through as one row with prompt null.

`workers.captioner.Captioner` does the work; `CaptionStage` only shapes what it returns into the
output schema inside the actor, so the frame bytes and the intermediate columns never travel to
the driver, and every block has the same types.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any, Mapping

import pyarrow as pa

from pipeline.config import JobConfig
from pipeline.schema import FILE_SCHEMA, conform
from pipeline.storage import Storage
from workers.captioner import Captioner
from workers.provenance import engine_fingerprint


def captioner_kwargs(cfg: JobConfig) -> dict[str, Any]:
    """Constructor arguments of the actor: plain dicts, so the worker needs no pipeline types."""
    return {
        "model_cfg": dataclasses.asdict(cfg.model),
        "generation_cfg": dataclasses.asdict(cfg.generation),
        "prompt_cfg": dataclasses.asdict(cfg.prompt),
        "cache_dir": cfg.model.cache_dir,
        "storage": Storage(cfg.storage),  # picklable; its S3 clients are built in the actor
        "num_gpus": cfg.actors.num_gpus,
        "quality_cfg": dataclasses.asdict(cfg.quality),
        "memory_fraction": cfg.actors.memory_fraction,
        "memory_budget_gib": cfg.actors.memory_budget_gib,
    }


def run_fingerprint(cfg: JobConfig) -> str:
    """The engine fingerprint this run's actors stamp on their rows (what resume compares)."""
    return engine_fingerprint(dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.generation), cfg.prompt.system)


class CaptionStage(Captioner):
    """The Captioner actor, returning `FILE_SCHEMA` tables stamped with this run's id."""

    def __init__(self, run_id: str, **captioner_kwargs: Any) -> None:
        super().__init__(**captioner_kwargs)
        self.run_id = run_id

    def __call__(self, batch: Mapping[str, Any]) -> pa.Table:
        return to_output_table(super().__call__(batch), self.run_id)


def to_output_table(columns: dict[str, list] | pa.Table, run_id: str) -> pa.Table:
    """The worker's columns (or plan rows) -> FILE_SCHEMA: parse times, metadata JSON -> map,
    name the file in errors."""
    columns = columns.to_pydict() if isinstance(columns, pa.Table) else dict(columns)
    n = len(columns.get("video_uri", []))
    columns["run_id"] = [run_id] * n
    columns["prompt"] = [p or "" for p in columns.get("prompt", [None] * n)]  # '' = video/clip-level row
    for name in ("started_at", "finished_at"):
        columns[name] = [_utc(v) for v in columns.get(name, [None] * n)]
    columns["metadata"] = [list(json.loads(m or "{}").items()) for m in columns.get("metadata_json", ["{}"] * n)]
    columns["error"] = [_name_file(uri, e) for uri, e in zip(columns["video_uri"], columns.get("error", [None] * n))]
    return conform(columns, FILE_SCHEMA)


def _utc(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value)).astimezone(dt.timezone.utc)


def _name_file(uri: str, error: str | None) -> str | None:
    """Model errors come from inside the model; prefix the input so every message names its file."""
    return error if error is None or error.startswith(uri) else f"{uri}: {error}"
