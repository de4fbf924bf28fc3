"""pipeline.storage under the faults of issue 10: broken and silent S3 objects through a
fault-injecting proxy (tests/s3_faults.py), credentials in the endpoint, non-regular files,
and the leftovers of a crashed writer. Each of these failed on main 307c679."""

from __future__ import annotations

import os
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline._discover import read_manifest
from pipeline.config import StorageConfig
from pipeline.storage import Storage, StorageError
from tests.s3_faults import FaultProxy

BODY = os.urandom(300_000)
PASSWORD = "hunter2-in-the-endpoint"


@pytest.fixture
def objects(s3_server: str, s3_bucket: str) -> str:
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for name in ("good.mp4", "cut.mp4", "hang.mp4"):
        client.put_object(Bucket=s3_bucket, Key=f"raw/{name}", Body=BODY)
    return s3_bucket


def proxied(proxy: FaultProxy, **options: float) -> Storage:
    return Storage(StorageConfig(endpoint_url=proxy.url, max_attempts=2, **options))


def test_a_download_that_always_breaks_is_a_transient_error_naming_the_uri(s3_server, objects, tmp_path):
    with FaultProxy(s3_server, {"raw/cut.mp4": "cut"}) as proxy:
        storage = proxied(proxy, read_timeout_s=5)
        assert Path(storage.local_copy(f"s3://{objects}/raw/good.mp4", str(tmp_path))).read_bytes() == BODY
        with pytest.raises(StorageError) as info:
            storage.local_copy(f"s3://{objects}/raw/cut.mp4", str(tmp_path))
    assert info.value.kind == "transient" and info.value.uri == f"s3://{objects}/raw/cut.mp4"
    # s3transfer re-reads the broken body max_attempts times; nothing multiplies that count
    assert 2 <= proxy.hits["raw/cut.mp4"] <= 2 * 2
    assert not list(tmp_path.rglob("cut.mp4")) and not list(tmp_path.rglob(".*.tmp"))


def test_an_object_that_never_answers_costs_at_most_object_timeout_s(s3_server, objects, tmp_path):
    with FaultProxy(s3_server, {"raw/hang.mp4": "silent"}) as proxy:
        storage = proxied(proxy, read_timeout_s=30, object_timeout_s=2)
        assert storage.s3_client is not None  # built here, not inside the 2 s: cold, it took longer on a loaded machine
        started = time.monotonic()
        with pytest.raises(StorageError, match="storage.object_timeout_s=2") as info:
            storage.local_copy(f"s3://{objects}/raw/hang.mp4", str(tmp_path))
        elapsed_s = time.monotonic() - started
        assert info.value.kind == "transient" and info.value.uri == f"s3://{objects}/raw/hang.mp4"
        assert elapsed_s < 4, elapsed_s
        assert proxy.hits["raw/hang.mp4"] == 1
        # the rest goes on: another object through the same client
        assert Path(storage.local_copy(f"s3://{objects}/raw/good.mp4", str(tmp_path))).read_bytes() == BODY


def test_read_timeout_fails_an_attempt_that_goes_silent(s3_server, objects):
    with FaultProxy(s3_server, {"raw/hang.mp4": "silent"}) as proxy:
        storage = proxied(proxy, read_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            storage.read_bytes(f"s3://{objects}/raw/hang.mp4")
        assert info.value.kind == "transient" and time.monotonic() - started < 10
        assert proxy.hits["raw/hang.mp4"] >= 2  # botocore retried the silent request


def test_an_invalid_bucket_name_is_an_invalid_storage_error_not_a_crash(s3_server, tmp_path):
    """A manifest may name anything: botocore refuses the name before sending (ParamValidationError)."""
    storage = Storage(StorageConfig(endpoint_url=s3_server, max_attempts=1))
    with pytest.raises(StorageError, match="Invalid bucket name") as info:
        storage.local_copy("s3://Bad_Bucket!/a.mp4", str(tmp_path))
    assert info.value.kind == "invalid" and info.value.uri == "s3://Bad_Bucket!/a.mp4"


def test_a_manifest_entry_with_another_scheme_is_refused_by_name(tmp_path):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"uri": "gs://bucket/a.mp4"}\n')
    storage = Storage()
    [record] = read_manifest(storage, str(manifest))
    assert record["uri"] == "gs://bucket/a.mp4"  # not a local file named gs:/bucket/a.mp4
    with pytest.raises(StorageError, match=r"^gs://bucket/a.mp4: gs:// is not supported; use s3:// or a local path$"):
        storage.local_copy(record["uri"], str(tmp_path / "cache"))


def test_credentials_in_the_endpoint_never_reach_a_message(s3_server, objects):
    host = s3_server.removeprefix("http://")
    storage = Storage(StorageConfig(endpoint_url=f"http://ana:{PASSWORD}@{host}", max_attempts=1))
    assert storage.read_bytes(f"s3://{objects}/raw/good.mp4") == BODY  # the endpoint still works
    pq_uri = f"s3://{objects}/t.parquet"
    storage.write_parquet_atomic(pa.table({"a": [1]}), pq_uri)  # pyarrow gets host:port only
    assert storage.read_parquet(pq_uri)["a"].to_pylist() == [1]
    dead = Storage(StorageConfig(endpoint_url=f"http://ana:{PASSWORD}@127.0.0.1:9", max_attempts=1))
    with pytest.raises(StorageError) as info:
        dead.read_bytes(f"s3://{objects}/raw/good.mp4")
    assert PASSWORD not in str(info.value) and "***@127.0.0.1:9" in str(info.value)
    assert PASSWORD not in info.value.reason


@pytest.mark.parametrize("form", ["folder", "glob", "file"])
def test_a_fifo_named_like_a_video_is_listed_and_refused_by_name(tmp_path, form):
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "pipe.mp4")
    (folder / "real.mp4").write_bytes(b"x")
    storage = Storage()
    uri = {"folder": str(folder), "glob": f"{folder}/*.mp4", "file": str(folder / "pipe.mp4")}[form]
    listed = storage.list_videos(uri, ["mp4"])
    assert str(folder / "pipe.mp4") in listed
    with pytest.raises(StorageError, match="pipe.mp4: is a FIFO, not a regular file") as info:
        storage.local_copy(str(folder / "pipe.mp4"), str(tmp_path / "cache"))
    assert info.value.kind == "invalid"


def test_a_fifo_becomes_an_error_row_naming_it_from_a_folder_and_a_manifest(tmp_path):
    """Stage 2 never opens it (opening a FIFO blocks): the row says what the file is."""
    from pipeline._discover import discover
    from pipeline._probe import probe_batch
    from pipeline.config import InputConfig

    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "list.jsonl").write_text('{"uri": "pipe.mp4"}\n')
    for uri in (str(tmp_path), str(tmp_path / "list.jsonl")):
        probed = probe_batch(discover(InputConfig(uri=uri), Storage()), storage=Storage(),
                             cache_dir=str(tmp_path / "cache"), timeout_s=10).to_pylist()
        assert [(r["status"], r["error"]) for r in probed] == [
            ("error", f"{tmp_path / 'pipe.mp4'}: is a FIFO, not a regular file (invalid)")]


def test_temporaries_of_a_crashed_writer_are_removed_and_files_move(tmp_path):
    storage = Storage()
    data = tmp_path / "data" / "job=x" / "run_date=2026-11-29"
    data.mkdir(parents=True)
    (data / ".part-r1-00000.parquet.0a1b.tmp").write_bytes(b"")
    (data / "part-r1-00000.parquet").write_bytes(b"")
    assert storage.remove_temporaries(str(tmp_path / "data")) == [str(data / ".part-r1-00000.parquet.0a1b.tmp")]
    assert storage.list_files(str(tmp_path / "data")) == [str(data / "part-r1-00000.parquet")]
    storage.move(str(data / "part-r1-00000.parquet"), str(tmp_path / "aside" / "p.parquet"))
    assert (tmp_path / "aside" / "p.parquet").exists() and not (data / "part-r1-00000.parquet").exists()


def test_s3_move_copies_then_deletes(s3_server, objects):
    storage = Storage(StorageConfig(endpoint_url=s3_server))
    storage.move(f"s3://{objects}/raw/good.mp4", f"s3://{objects}/aside/good.mp4")
    assert storage.read_bytes(f"s3://{objects}/aside/good.mp4") == BODY
    assert not storage.exists(f"s3://{objects}/raw/good.mp4")


def test_parquet_parts_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    """The bytes must be on disk before the name is: else a crash leaves a 0-byte part file."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-file" if os.path.isfile(f"/proc/self/fd/{fd}") else "fsync-folder")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    Storage().write_parquet_atomic(pa.table({"a": [1, 2]}), str(tmp_path / "p.parquet"))
    assert events == ["fsync-file", "rename", "fsync-folder"]
    assert pq.read_table(tmp_path / "p.parquet")["a"].to_pylist() == [1, 2]
