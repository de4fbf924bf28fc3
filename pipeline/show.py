"""`python -m pipeline.show OUTPUT_URI [--job caption] [--rows 5]`: what a run left behind.

Prints where the Parquet dataset and the run summaries are, the latest summary's counts, and
a few rows, read back through the same storage layer the pipeline writes with (local or s3://).
"""

from __future__ import annotations

import argparse
import json

import pyarrow as pa

from pipeline._write import job_data_uri
from pipeline.storage import Storage

SHOWN_COLUMNS = ("video_uri", "clip_index", "start_s", "end_s", "status", "output_text", "error", "partial_reason",
                 "retention_achieved", "visual_tokens_per_stage", "model_random_weights")


def latest_summary(storage: Storage, output_uri: str, job: str) -> dict | None:
    summaries = storage.list_files(f"{output_uri.rstrip('/')}/runs/job={job}", suffix="summary.json")
    if not summaries:
        return None
    runs = [json.loads(storage.read_bytes(uri)) for uri in summaries]
    return max(runs, key=lambda s: str(s.get("finished_at") or ""))


def sample_rows(table: pa.Table, count: int) -> list[dict]:
    columns = [c for c in SHOWN_COLUMNS if c in table.column_names]
    rows = [{k: v for k, v in row.items() if v is not None} for row in table.select(columns).to_pylist()]
    ok, other = [r for r in rows if r.get("status") == "ok"], [r for r in rows if r.get("status") != "ok"]
    return (ok[: max(1, count - 2)] + other)[:count]


def show(output_uri: str, job: str, rows: int) -> None:
    storage = Storage()
    data_uri = job_data_uri(output_uri, job)
    table = storage.read_parquet(data_uri)
    print(f"\nParquet dataset: {data_uri}  ({table.num_rows} rows, Hive partitions job=/run_date=)")
    summary = latest_summary(storage, output_uri, job)
    if summary is not None:
        print(f"Run summaries:   {output_uri.rstrip('/')}/runs/job={job}/<run_id>/summary.json")
        counts = {status: summary.get(f"rows_{status}") for status in ("ok", "error", "skipped")}
        print(f"Latest run:      {summary.get('run_id')}  rows by status: {counts}, "
              f"partial clips: {summary.get('clips_partial', 0)}")
    print(f"\nA few rows:")
    for row in sample_rows(table, rows):
        print("  " + json.dumps(row, default=str)[:400])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_uri")
    parser.add_argument("--job", default="caption")
    parser.add_argument("--rows", type=int, default=5)
    args = parser.parse_args(argv)
    show(args.output_uri, args.job, args.rows)


if __name__ == "__main__":
    main()
