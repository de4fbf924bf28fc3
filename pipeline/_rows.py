"""Helpers shared by the stages: typed Arrow blocks between stages, and error rows.

Stages exchange `pyarrow.Table` blocks with an explicit schema (never inferred), so a block whose
optional columns happen to be all null still has the same types as its neighbours.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa


def extend_schema(base: pa.Schema, *fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([*base, *(pa.field(name, dtype) for name, dtype in fields)])


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table of exactly `schema` (missing keys null, extra keys dropped)."""
    return pa.Table.from_pylist(list(rows), schema=schema)


def error_fields(uri: str, reason: str, stage: str) -> dict[str, Any]:
    """The columns of a failed row; the message always starts with the input's URI."""
    message = reason if reason.startswith(uri) else f"{uri}: {reason}"
    return {"status": "error", "error": message, "error_stage": stage}
