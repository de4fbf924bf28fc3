"""Everything checkable fails before Ray starts: exit 2, the dotted key, about a second.

Each case runs the real CLI (`python -m pipeline jobs/caption.yaml ...`) in a subprocess whose
RAY_TMPDIR is a fresh folder: Ray creates its session folder there on start, so an empty folder
proves no Ray session was made. On main 307c679 these cases exited 2 or 3 only after Ray had
started, exited 1 with a traceback (non-finite numbers), or ran (gs://).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, resolve
from tests.s3_server import FAKE_AWS_ENV

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "pw-typed-into-the-endpoint"
SECRET = "AKIA-secret-typed-into-a-number"
# About 1 s when idle (0.9 s on 2026-12-02, pyarrow its largest import; no torch, no Ray). 10.4 s was
# seen in range.sh's fresh venv (cold imports) beside the other test process, over the earlier 8 s
# bound. That Ray never started is asserted directly; this bound catches minutes of work before the error.
EARLY_S = 20.0


def cli(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float, Path]:
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir(exist_ok=True)
    env = {**os.environ, **FAKE_AWS_ENV, "RAY_TMPDIR": str(ray_tmp), "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline", str(REPO / "jobs" / "caption.yaml"), "preset=offline",
                             *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - started, ray_tmp


@pytest.fixture
def one_video(tmp_path: Path, shared_videos: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.mp4").symlink_to(shared_videos / "nasa_13013.mp4")
    return folder


def early_failure(tmp_path: Path, key: str, *overrides: str) -> str:
    result, elapsed_s, ray_tmp = cli(tmp_path, *overrides)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    [line] = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"config error: {key}:"), line
    assert not any(ray_tmp.iterdir()) and "Started a local Ray instance" not in result.stderr
    assert elapsed_s < EARLY_S, elapsed_s
    return line


def test_an_output_written_by_a_newer_schema_is_refused_and_left_as_it_is(tmp_path: Path, one_video: Path) -> None:
    """An older deployment would rewrite the newer files with its own, smaller schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import FILE_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY

    newer = tmp_path / "out" / "data" / "job=caption" / "run_date=2026-12-01" / "part-r9-00000.parquet"
    newer.parent.mkdir(parents=True)
    schema = FILE_SCHEMA.append(pa.field("a_newer_column", pa.string())).with_metadata(
        {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION + 1).encode()})
    pq.write_table(pa.Table.from_pylist([{"clip_id": "c", "prompt": "", "status": "ok", "video_uri": "/v.mp4",
                                          "run_id": "r9", "a_newer_column": "x"}], schema=schema), newer)
    written = newer.read_bytes()
    for _ in range(2):  # the lease is released: the second run gets the same answer, not "output busy"
        line = early_failure(tmp_path, "output.uri", f"input.uri={one_video}", f"output.uri={tmp_path / 'out'}")
        assert f"schema version {SCHEMA_VERSION + 1}, newer than this v2drop-batch's {SCHEMA_VERSION}" in line
    assert newer.read_bytes() == written


def test_empty_input_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = early_failure(tmp_path, "input.uri", f"input.uri={tmp_path / 'empty'}", f"output.uri={tmp_path / 'out'}")
    assert "no videos with extensions" in line


def test_output_that_cannot_be_written(tmp_path: Path, one_video: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the output folder would go")
    line = early_failure(tmp_path, "output.uri", f"input.uri={one_video}", f"output.uri={tmp_path / 'blocker' / 'out'}")
    assert "cannot use" in line


def test_missing_bucket_and_a_password_in_the_endpoint(tmp_path: Path, one_video: Path, s3_server: str) -> None:
    endpoint = s3_server.replace("http://", f"http://ana:{PASSWORD}@")
    result, _, _ = cli(tmp_path, f"input.uri={one_video}", "output.uri=s3://no-such-bucket/out",
                       f"storage.endpoint_url={endpoint}")
    assert result.returncode == 2 and "output.uri: cannot use s3://no-such-bucket/out (missing" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout and "***@127.0.0.1" in result.stdout


def test_denied_bucket(tmp_path: Path, one_video: Path, s3_server: str, s3_bucket: str) -> None:
    import boto3

    policy = ('{"Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", '
              f'"Resource": "arn:aws:s3:::{s3_bucket}/*"}}]}}')
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").put_bucket_policy(Bucket=s3_bucket, Policy=policy)
    result, _, _ = cli(tmp_path, f"input.uri={one_video}", f"output.uri=s3://{s3_bucket}/out",
                       f"storage.endpoint_url={s3_server}")
    assert result.returncode == 2 and f"output.uri: cannot use s3://{s3_bucket}/out (denied" in result.stderr


@pytest.mark.parametrize("source, expected", [
    ("tiny:unknown", "model.source: unknown tiny family 'unknown'; known: tiny:qwen2_5_vl, tiny:qwen3_vl"),
    ("/nonexistent/model", "model.source: /nonexistent/model is not a folder"),
    ("gs://bucket/model", "model.source: gs:// is not supported"),
])
def test_model_source_that_cannot_load(tmp_path: Path, one_video: Path, source: str, expected: str) -> None:
    line = early_failure(tmp_path, "model.source", f"input.uri={one_video}", f"output.uri={tmp_path / 'out'}",
                         f"model.source={source}")
    assert expected in line


@pytest.mark.parametrize("key", ["decode.fps", "clips.clip_len_s", "storage.read_timeout_s"])
def test_non_finite_numbers(tmp_path: Path, one_video: Path, key: str) -> None:
    line = early_failure(tmp_path, key, f"input.uri={one_video}", f"{key}=inf")
    assert line.endswith("must be a finite number, got inf") or "must be" in line


@pytest.mark.parametrize("scheme", ["gs", "abfs", "hdfs"])
def test_unsupported_uri_schemes_are_refused_not_read_as_folders(tmp_path: Path, one_video: Path, scheme: str) -> None:
    line = early_failure(tmp_path, "output.uri", f"input.uri={one_video}", f"output.uri={scheme}://bucket/out")
    assert f"{scheme}:// is not supported; give a local path or s3:// | file://" in line
    assert not (tmp_path / f"{scheme}:").exists()


def test_a_secret_typed_into_the_wrong_key_is_not_echoed(tmp_path: Path) -> None:
    line = early_failure(tmp_path, "storage.max_attempts", f"storage.max_attempts={SECRET}")
    assert SECRET not in line and "not shown" in line


# --- the same rules, in process ------------------------------------------------------------------


def test_config_refuses_every_non_finite_float() -> None:
    for layer in ({"clips": {"stride_s": float("inf")}}, {"run": {"flush_interval_s": float("inf")}},
                  {"decode": {"timeout_s": float("nan")}}):
        with pytest.raises(ConfigError) as info:
            resolve([layer])
        section, values = next(iter(layer.items()))
        assert str(info.value).startswith(f"{section}.{next(iter(values))}:")


def test_wrong_type_values_are_echoed_only_where_no_secret_can_be() -> None:
    with pytest.raises(ConfigError, match="actors.batch_size: Value 'eight'"):
        resolve([{"actors": {"batch_size": "eight"}}])
    with pytest.raises(ConfigError) as info:
        resolve([{"storage": {"max_attempts": SECRET}}])
    assert SECRET not in str(info.value)
