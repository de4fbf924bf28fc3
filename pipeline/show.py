"""`python -m pipeline.show OUTPUT_URI [--job caption] [--rows 5] [storage.KEY=VALUE ...]`: what
runs left behind.

Prints where the rows, the run summaries and the latest run's report are, the latest run's
counts, and a few rows. It reads only what it prints: the summaries (one small row per run),
each data file's footer for the row count, and the shown columns of as many files as the
sample needs. `storage.*` options are the job file's (`storage.endpoint_url=http://127.0.0.1:9000`
for MinIO or moto). Exit codes: 0 shown; 2 a bad option, or no output of that job at that URI.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline._write import ERRORS_SUFFIX, job_data_uri, run_dir_uri, summaries_uri
from pipeline.config import ConfigError, JobConfig, resolve
from pipeline.config_checks import parse_overrides
from pipeline.redact import redact
from pipeline.storage import Storage, StorageError

SHOWN_COLUMNS = ("video_uri", "clip_index", "start_s", "end_s", "status", "output_text", "error", "skip_reason",
                 "partial_reason", "retention_achieved", "visual_tokens_per_stage", "drop_layers", "model_random_weights")
EXIT_OK, EXIT_MISSING = 0, 2


def read_summaries(storage: Storage, output_uri: str, job: str) -> list[dict[str, Any]]:
    """Every run's summary row of the job (pipeline.schema.SUMMARY_SCHEMA), oldest first."""
    uris = storage.list_files(summaries_uri(output_uri, job), suffix=".parquet")
    rows = [row for uri in uris for row in storage.read_parquet(uri).to_pylist()]
    return sorted(rows, key=lambda s: s["finished_at"])


def row_count(storage: Storage, uri: str) -> int:
    import pyarrow.parquet as pq

    filesystem, path = storage.arrow_filesystem(uri)
    with filesystem.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata.num_rows  # the footer only


def sample_rows(storage: Storage, files: list[str], count: int) -> list[dict]:
    """Up to `count` rows, mostly ok ones and at least one of each other kind met, reading the
    shown columns of the newest files first and stopping once the sample is full."""
    ok: list[dict] = []
    other: list[dict] = []
    for uri in sorted(files, reverse=True):
        table = storage.read_parquet(uri, columns=list(SHOWN_COLUMNS), absent_as_null=True)
        for row in table.to_pylist():
            row = {k: v for k, v in row.items() if v is not None}
            (ok if row.get("status") == "ok" else other).append(row)
        if len(ok) >= count and other:
            break
    return (ok[: max(1, count - len(other[:2]))] + other)[:count]


def show(output_uri: str, job: str, rows: int, storage: Storage | None = None) -> int:
    storage = storage or Storage()
    data_uri = job_data_uri(output_uri, job)
    files = storage.list_files(data_uri, suffix=".parquet")
    summaries = read_summaries(storage, output_uri, job)
    if not files and not summaries:
        print(f"show: no output of job {job!r} at {output_uri} (nothing under {data_uri} or "
              f"{summaries_uri(output_uri, job)}); check the URI, --job and storage.* options", file=sys.stderr)
        return EXIT_MISSING
    total = sum(row_count(storage, uri) for uri in files)
    errors = sum(1 for uri in files if uri.endswith(ERRORS_SUFFIX))
    print(f"\nRows:            {data_uri}  ({total} rows in {len(files)} files, {errors} of them error files; "
          "Hive partitions job=/run_date=)")
    print(f"Run summaries:   {summaries_uri(output_uri, job)}  ({len(summaries)} runs)")
    if summaries:
        latest = summaries[-1]
        counts = {status: latest[f"rows_{status}"] for status in ("ok", "error", "skipped")}
        run_dir = run_dir_uri(output_uri, job, latest["run_id"])
        print(f"Latest run:      {latest['run_id']}  rows by status: {counts}, partial clips: {latest['clips_partial']}")
        print(f"Its report:      {run_dir}/report.html  (summary.json and config.yaml beside it)")
    print("\nA few rows:")
    for row in sample_rows(storage, files, rows):
        print("  " + json.dumps(row, default=str)[:400])
    return EXIT_OK


def storage_from_options(options: list[str]) -> Storage:
    """`storage.KEY=VALUE` options, checked as the job file's storage section is."""
    wrong = [o for o in options if not o.startswith("storage.")]
    if wrong:
        raise ConfigError(f"{wrong[0].split('=')[0]}: pipeline.show takes only storage.* options, e.g. "
                          "storage.endpoint_url=http://127.0.0.1:9000")
    return Storage(resolve([parse_overrides(options, JobConfig)]).storage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.show", description=__doc__.splitlines()[0])
    parser.add_argument("output_uri")
    parser.add_argument("storage_options", nargs="*", metavar="storage.KEY=VALUE")
    parser.add_argument("--job", default="caption")
    parser.add_argument("--rows", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        storage = storage_from_options(args.storage_options)
        return show(args.output_uri, args.job, args.rows, storage)
    except ConfigError as e:
        print(redact(f"show: {e}"), file=sys.stderr)
        return EXIT_MISSING
    except StorageError as e:
        print(redact(f"show: cannot read {args.output_uri} ({e.kind}: {e})"), file=sys.stderr)
        return EXIT_MISSING


if __name__ == "__main__":
    sys.exit(main())
