"""The model stage's rows -> the written schema (`pipeline.schema.FILE_SCHEMA`): times parsed,
metadata JSON -> map, the input named in every error, per-row shares of the per-call timings.

No torch import: the driver shapes plan rows here, and stand-in stages run without a model stack.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa

from pipeline.schema import FILE_SCHEMA, conform
from workers.rows import MODEL_COLUMNS

# The worker's peak_memory_bytes is written under the name of what it measured (to_output_table).
_RENAMED = {"peak_memory_bytes"}
if _undeclared := sorted(set(MODEL_COLUMNS) - _RENAMED - set(FILE_SCHEMA.names)):  # fails at import, not mid-run
    raise ImportError(f"workers.model_stage.MODEL_COLUMNS {_undeclared} are not declared in pipeline.schema.ROW_SCHEMA")


def to_output_table(columns: dict[str, list] | pa.Table, run_id: str, on_gpu: bool = False) -> pa.Table:
    """The worker's columns (or plan rows) -> FILE_SCHEMA: parse times, metadata JSON -> map,
    name the file in errors, per-row shares of the per-call timings, the peak memory under the
    name of what it measured (workers.generation: device memory on GPU, host RSS on CPU).

    Rows that never reached a model call get `finished_at` = now: the time their row was made."""
    columns = columns.to_pydict() if isinstance(columns, pa.Table) else dict(columns)
    n = len(columns.get("video_uri", []))
    columns["run_id"] = [run_id] * n
    columns["prompt"] = [p or "" for p in columns.get("prompt", [None] * n)]  # '' = video/clip-level row
    for name in ("started_at", "finished_at"):
        columns[name] = [_utc(v) for v in columns.get(name, [None] * n)]
    now = dt.datetime.now(dt.UTC)
    columns["finished_at"] = [v or now for v in columns["finished_at"]]
    peak = columns.pop("peak_memory_bytes", [None] * n)
    columns["peak_device_memory_bytes" if on_gpu else "peak_host_rss_bytes"] = peak
    columns.update(call_shares(columns.get("batch_id", [None] * n), columns.get("prefill_ms", [None] * n),
                               columns.get("generate_ms", [None] * n), columns.get("flops_dropped", [None] * n)))
    columns["metadata"] = [list(json.loads(m or "{}").items()) for m in columns.get("metadata_json", ["{}"] * n)]
    columns["error"] = [_name_file(uri, e) for uri, e in zip(columns["video_uri"], columns.get("error", [None] * n))]
    return conform(columns, FILE_SCHEMA)


def call_shares(batch_ids: list, prefill_ms: list, generate_ms: list, flops_dropped: list) -> dict[str, list]:
    """Each row's attributable part of its call's time: `prefill_ms_share` in proportion to the
    row's prefill FLOPs (as the FLOP columns share a shared video prefill), `generate_ms_share`
    that plus an equal part of the decode steps (a batch decodes all its rows together). Over a
    call's rows they sum to its prefill_ms and generate_ms. Rows without a call get null.

    Example: one call, prefill 100 ms, generate 400 ms, rows with 30 and 10 FLOPs ->
    prefill shares 75, 25; generate shares 75 + 150 = 225, 25 + 150 = 175.
    """
    calls: dict[str, list[int]] = {}
    for i, batch_id in enumerate(batch_ids):
        if batch_id is not None and prefill_ms[i] is not None and generate_ms[i] is not None:
            calls.setdefault(batch_id, []).append(i)
    prefill_share: list[float | None] = [None] * len(batch_ids)
    generate_share: list[float | None] = [None] * len(batch_ids)
    for rows in calls.values():
        flops = [float(flops_dropped[i] or 0.0) for i in rows]
        total = sum(flops)
        decode_ms = max(generate_ms[rows[0]] - prefill_ms[rows[0]], 0.0) / len(rows)
        for i, f in zip(rows, flops):
            prefill_share[i] = prefill_ms[i] * (f / total if total else 1 / len(rows))
            generate_share[i] = prefill_share[i] + decode_ms
    return {"prefill_ms_share": prefill_share, "generate_ms_share": generate_share}


def _utc(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value)).astimezone(dt.UTC)


def _name_file(uri: str, error: str | None) -> str | None:
    """Model errors come from inside the model; prefix the input so every message names its file."""
    return error if error is None or error.startswith(uri) else f"{uri}: {error}"
