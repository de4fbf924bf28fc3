"""Stage 1, discover (driver): the job's input as one row per video (1:1 with inputs).

Columns out (`VIDEO_SCHEMA`): video_uri, questions (list<str>, manifest only), metadata_json
(the manifest's other columns as a JSON object of strings; '{}' for folder inputs).
A manifest row naming a missing file is kept: the probe stage turns it into an error row.
Manifests (.csv, .jsonl, .parquet) are read here, through `Storage` for the bytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from typing import Any

import pyarrow as pa

from pipeline._rows import to_table
from pipeline.config import InputConfig
from pipeline.local_files import local_path
from pipeline.s3 import OTHER_SCHEME, split_s3_uri
from pipeline.storage import Storage
from pipeline.storage_errors import StorageError, translated

MANIFEST_URI_COLUMNS = ("uri", "video", "path")  # first one present names the video

VIDEO_SCHEMA = pa.schema(
    [("video_uri", pa.string()), ("questions", pa.list_(pa.string())), ("metadata_json", pa.string())]
)


def discover(cfg: InputConfig, storage: Storage) -> pa.Table:
    """Sorted, de-duplicated videos of the input, at most `cfg.limit` of them."""
    return videos_table(list_videos(cfg, storage))


def list_videos(cfg: InputConfig, storage: Storage) -> list[dict[str, Any]]:
    """The rows of `discover` as dicts: cheap to check for emptiness before pyarrow builds a table
    (building the first table imports pandas, a second or more of a preflight that should fail fast)."""
    records = read_manifest(storage, cfg.uri) if cfg.is_manifest else [{"uri": u} for u in storage.list_videos(cfg.uri, cfg.extensions)]
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


# -- manifests ----------------------------------------------------------------------------


def _manifest_rows(uri: str, data: bytes) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows) of a .csv / .jsonl / .parquet manifest."""
    suffix = posixpath.splitext(uri.lower())[1]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_text(uri, data)))
        return list(reader.fieldnames or []), [_csv_row(uri, n, row) for n, row in enumerate(reader, 1)]
    if suffix in (".jsonl", ".ndjson"):
        rows = [_json_line(uri, n, line) for n, line in enumerate(_text(uri, data).splitlines(), 1)
                if line.strip()]
        return sorted({k for row in rows for k in row}), rows
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with translated(uri):
            table = pq.read_table(pa.BufferReader(data))
        return table.column_names, table.to_pylist()
    raise StorageError(uri, "manifest must end in .csv, .jsonl or .parquet", "invalid")


def _text(uri: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as spreadsheets write one, is not a column name
    except UnicodeDecodeError as exc:
        raise StorageError(uri, f"not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                                "save the manifest as UTF-8", "invalid") from None


def _csv_row(uri: str, row_number: int, row: dict[str | None, Any]) -> dict[str, Any]:
    """A CSV row; one with more cells than the header has names (an unquoted comma in a
    question) is refused, never cut short."""
    if None in row:
        raise StorageError(uri, f"row {row_number} has {len(row[None])} more cell(s) than the header "
                                "names: quote a cell that holds a comma", "invalid")
    return row  # type: ignore[return-value] - no None key


def _json_line(uri: str, line_number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise StorageError(uri, f"line {line_number} is not JSON: {exc}", "invalid") from exc
    if not isinstance(row, dict):
        raise StorageError(uri, f"line {line_number} is not a JSON object", "invalid")
    return row


def _parse_questions(uri: str, row_number: int, value: Any) -> list[str]:
    """A list, a JSON list string, or 'q1|q2' (CSV cells cannot hold lists); empty -> []."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise StorageError(uri, f"row {row_number}: questions is not a JSON list",
                                   "invalid") from exc
        else:
            return [q.strip() for q in text.split("|") if q.strip()]
    if not isinstance(value, list | tuple):
        raise StorageError(uri, f"row {row_number}: questions must be a list", "invalid")
    return [str(q) for q in value if str(q).strip()]


def _metadata_str(value: Any) -> str:
    """Metadata columns are kept as strings so every output row has one simple schema."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _resolve_video_uri(value: str, manifest_uri: str) -> str:
    """Absolute paths and s3:// URIs as given; relative ones against the manifest's folder.
    Another scheme (gs://) is kept as given, for local_copy to refuse by name in its row."""
    if Storage.is_s3(value) or OTHER_SCHEME.match(value):
        return value
    if Storage.is_s3(manifest_uri):
        if value.startswith("/"):
            raise StorageError(manifest_uri, f"local path {value!r} in an S3 manifest", "invalid")
        bucket, key = split_s3_uri(manifest_uri)
        return f"s3://{bucket}/{posixpath.normpath(posixpath.join(posixpath.dirname(key), value))}"
    value = os.path.expanduser(value.removeprefix("file://"))
    return os.path.abspath(os.path.join(os.path.dirname(local_path(manifest_uri)), value))


def _manifest_record(uri: str, row_number: int, row: dict[str, Any], column: str) -> dict[str, Any]:
    video = row.get(column)
    if video is None or not str(video).strip():
        raise StorageError(uri, f"row {row_number}: empty {column!r}", "invalid")
    metadata = {k: _metadata_str(v) for k, v in row.items() if k not in (column, "questions")}
    return {**metadata, "uri": _resolve_video_uri(str(video).strip(), uri),
            "questions": _parse_questions(uri, row_number, row.get("questions"))}




def read_manifest(storage: Storage, uri: str) -> list[dict[str, Any]]:
    """Rows of a .csv/.jsonl/.parquet manifest: {'uri', 'questions': list[str], **metadata: str}.

    The video column is the first of `uri`, `video`, `path` present; relative entries are
    resolved against the manifest's own folder (or S3 prefix).
    """
    columns, rows = _manifest_rows(uri, storage.read_bytes(uri))
    column = next((c for c in MANIFEST_URI_COLUMNS if c in columns), None)
    if column is None:
        raise StorageError(uri, f"manifest needs a column named one of {MANIFEST_URI_COLUMNS}; "
                                f"found {columns}", "invalid")
    return [_manifest_record(uri, n, row, column) for n, row in enumerate(rows, 1)]
