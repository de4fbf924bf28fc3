"""pipeline.storage against real files and a real HTTP S3 endpoint (moto's server on 127.0.0.1).

Request counts are taken from botocore's `before-send` event, i.e. what actually went on the
wire (retries included).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import threading
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.awsrequest import AWSResponse
from pyarrow import fs as pafs

from pipeline._discover import read_manifest
from pipeline.config import StorageConfig
from pipeline.node_cache import COMPLETE_MARKER
from pipeline.storage import Storage, StorageError
from tests.s3_server import seed_objects  # s3_server, s3_bucket: fixtures from tests/conftest.py

VIDEO_EXTENSIONS = ["mp4", "mkv", "mov"]


@pytest.fixture
def storage(s3_server: str) -> Storage:
    return Storage(StorageConfig(endpoint_url=s3_server, region="us-east-1"))


@pytest.fixture
def s3(s3_server: str):
    """A plain boto3 client for arranging fixtures, separate from the one under test."""
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


def count_sends(storage: Storage) -> Counter:
    """Counter of operation name -> HTTP requests sent by `storage`'s client from now on."""
    sent: Counter = Counter()

    def on_send(event_name: str, **_) -> None:
        sent[event_name.rsplit(".", 1)[-1]] += 1

    storage.s3_client.meta.events.register("before-send.s3", on_send)
    return sent


class _RawBody:
    """The `raw` of an AWSResponse: botocore streams error bodies and read()s object bodies."""

    def __init__(self, body: bytes):
        self._buffer = io.BytesIO(body)

    def stream(self, **_):
        yield self._buffer.read()

    def read(self, amt=None, **_):
        return self._buffer.read(amt)


def answer_first_requests(storage: Storage, times: int, status: int, body: bytes, headers=None):
    """Answer the first `times` requests of `storage` with a canned response instead of sending."""
    answered = {"count": 0}

    def before_send(request, **_):
        if answered["count"] < times:
            answered["count"] += 1
            return AWSResponse(request.url, status, headers or {}, _RawBody(body))
        return None

    storage.s3_client.meta.events.register("before-send.s3", before_send)
    return answered


SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


# ---------------------------------------------------------------- options and pickling


def test_from_config_and_option_checks(s3_server):
    cfg = StorageConfig(endpoint_url=s3_server, region="eu-west-1", addressing_style="path", max_attempts=3,
                        connect_timeout_s=2.0, read_timeout_s=5.0, object_timeout_s=30.0)
    storage = Storage(cfg)
    assert storage.options == StorageConfig(s3_server, "eu-west-1", "path", 3, 2.0, 5.0, 30.0)
    config = storage.s3_client.meta.config
    assert config.s3["addressing_style"] == "path"
    assert config.retries == {"total_max_attempts": 3, "mode": "standard"}
    assert (config.connect_timeout, config.read_timeout) == (2.0, 5.0)
    with pytest.raises(ValueError, match="storage.addressing_style"):
        StorageConfig(addressing_style="dns")
    with pytest.raises(ValueError, match="storage.max_attempts"):
        StorageConfig(max_attempts=0)


def test_auto_addressing_is_path_style_with_an_endpoint(s3_server):
    assert Storage(StorageConfig(endpoint_url=s3_server)).s3_client.meta.config.s3 == {
        "addressing_style": "path"}
    assert Storage().s3_client.meta.config.s3 == {"addressing_style": "auto"}


def test_storage_pickles_without_clients_and_works_after(storage, s3, s3_bucket):
    s3.put_object(Bucket=s3_bucket, Key="a.txt", Body=b"hello")
    assert storage.read_bytes(f"s3://{s3_bucket}/a.txt") == b"hello"  # builds a client
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.options == storage.options and clone._clients == {}
    assert clone.read_bytes(f"s3://{s3_bucket}/a.txt") == b"hello"


def test_storage_error_pickles_with_its_fields():
    err = pickle.loads(pickle.dumps(StorageError("s3://b/k", "does not exist", "missing")))
    assert (err.uri, err.reason, err.kind, str(err)) == (
        "s3://b/k", "does not exist", "missing", "s3://b/k: does not exist")


# ---------------------------------------------------------------- listing


def test_list_videos_s3_reads_every_page(storage, s3_bucket):
    video_keys = [f"raw/{i // 100:02d}/clip-{i:04d}.mp4" for i in range(1050)]
    other_keys = ["raw/notes.txt", "raw/UPPER.MKV", "raw/.hidden.mp4", "raw-old/x.mp4", "raw/dir/"]
    seed_objects(s3_bucket, video_keys + other_keys)
    sent = count_sends(storage)

    videos = storage.list_videos(f"s3://{s3_bucket}/raw", VIDEO_EXTENSIONS)

    assert sent["ListObjectsV2"] == 2  # 1055 keys under raw/: a full page of 1000, then the rest
    expected = sorted(f"s3://{s3_bucket}/{k}" for k in video_keys + ["raw/UPPER.MKV"])
    assert videos == expected


def test_list_videos_s3_glob_single_object_and_empty_prefix(storage, s3, s3_bucket):
    for key in ["a/1.mp4", "a/2.mov", "a/b/3.mp4", "c.mp4"]:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    root = f"s3://{s3_bucket}"
    assert storage.list_videos(f"{root}/a/*.mp4", VIDEO_EXTENSIONS) == [f"{root}/a/1.mp4",
                                                                        f"{root}/a/b/3.mp4"]
    assert storage.list_videos(f"{root}/c.mp4", VIDEO_EXTENSIONS) == [f"{root}/c.mp4"]
    assert storage.list_videos(f"{root}/nothing-here", VIDEO_EXTENSIONS) == []
    assert len(storage.list_videos(root, VIDEO_EXTENSIONS)) == 4


def test_list_videos_local_folder_glob_and_file(storage, tmp_path):
    for rel in ["a.mp4", "b.MOV", "sub/c.mkv", "sub/deeper/d.mp4", "notes.txt", "._a.mp4",
                ".cache/e.mp4"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    expected = sorted(str(tmp_path / r) for r in ["a.mp4", "b.MOV", "sub/c.mkv", "sub/deeper/d.mp4"])
    assert storage.list_videos(str(tmp_path), VIDEO_EXTENSIONS) == expected
    assert storage.list_videos(str(tmp_path / "**" / "*.mp4"), ["mp4"]) == [
        str(tmp_path / "a.mp4"), str(tmp_path / "sub/deeper/d.mp4")]
    assert storage.list_videos(str(tmp_path / "a.mp4"), [".MP4"]) == [str(tmp_path / "a.mp4")]


def test_list_videos_local_missing_folder_names_it(storage, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(StorageError, match="nope") as info:
        storage.list_videos(missing, VIDEO_EXTENSIONS)
    assert (info.value.kind, info.value.uri) == ("missing", missing)


def test_list_files_suffix_and_missing_bucket(storage, s3, s3_bucket):
    for key in ["out/x/a.parquet", "out/b.parquet", "out/c.json", "outside.parquet"]:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    assert storage.list_files(f"s3://{s3_bucket}/out", ".parquet") == [
        f"s3://{s3_bucket}/out/b.parquet", f"s3://{s3_bucket}/out/x/a.parquet"]
    with pytest.raises(StorageError) as info:
        storage.list_files("s3://no-such-bucket-here/out")
    assert (info.value.kind, info.value.uri) == ("missing", "s3://no-such-bucket-here/out")


# ---------------------------------------------------------------- manifests

MANIFEST_ROWS = [
    {"uri": "clips/a.mp4", "questions": ["What happens?", "Who is there?"], "camera": "front"},
    {"uri": "b.mp4", "questions": [], "camera": "back"},
]


def write_manifest(fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in MANIFEST_ROWS).encode()
    if fmt == "csv":
        lines = ["uri,questions,camera"]
        lines += [f"{r['uri']},{'|'.join(r['questions'])},{r['camera']}" for r in MANIFEST_ROWS]
        return ("\n".join(lines) + "\n").encode()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(MANIFEST_ROWS), sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_read_manifest_local_resolves_relative_paths(storage, tmp_path, fmt):
    path = tmp_path / "lists" / f"manifest.{fmt}"
    path.parent.mkdir()
    path.write_bytes(write_manifest(fmt))
    assert read_manifest(storage, str(path)) == [
        {"uri": str(tmp_path / "lists/clips/a.mp4"), "questions": ["What happens?", "Who is there?"],
         "camera": "front"},
        {"uri": str(tmp_path / "lists/b.mp4"), "questions": [], "camera": "back"},
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_read_manifest_s3_resolves_relative_keys(storage, s3, s3_bucket, fmt):
    s3.put_object(Bucket=s3_bucket, Key=f"lists/manifest.{fmt}", Body=write_manifest(fmt))
    rows = read_manifest(storage, f"s3://{s3_bucket}/lists/manifest.{fmt}")
    assert [r["uri"] for r in rows] == [f"s3://{s3_bucket}/lists/clips/a.mp4",
                                        f"s3://{s3_bucket}/lists/b.mp4"]
    assert rows[0]["questions"] == ["What happens?", "Who is there?"]


def test_read_manifest_video_column_json_questions_and_metadata_as_str(storage, tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('video,questions,fps\n/data/x.mp4,"[""Q1?"", ""Q2?""]",30\ns3://b/y.mp4,,\n')
    assert read_manifest(storage, str(path)) == [
        {"uri": "/data/x.mp4", "questions": ["Q1?", "Q2?"], "fps": "30"},
        {"uri": "s3://b/y.mp4", "questions": [], "fps": ""},
    ]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "/v.mp4", "fps": 29.97, "tags": ["a"]}) + "\n")
    assert read_manifest(storage, str(jsonl)) == [
        {"uri": "/v.mp4", "questions": [], "fps": "29.97", "tags": '["a"]'}]


def test_read_manifest_without_uri_column_names_file_and_columns(storage, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("file,questions\na.mp4,\n")
    with pytest.raises(StorageError, match=r"bad\.csv.*'uri', 'video', 'path'.*\['file', 'questions'\]"):
        read_manifest(storage, str(path))


# ---------------------------------------------------------------- bytes and Parquet


def test_local_bytes_roundtrip_atomic_and_idempotent_delete(storage, tmp_path):
    uri = str(tmp_path / "deep" / "x.json")
    storage.write_bytes_atomic(uri, b"one")
    storage.write_bytes_atomic(uri, b"two")
    assert storage.read_bytes(uri) == b"two" and storage.exists(uri)
    assert os.listdir(tmp_path / "deep") == ["x.json"]  # no temp file left behind
    storage.delete(uri)
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(StorageError) as info:
        storage.read_bytes(uri)
    assert (info.value.kind, info.value.uri) == ("missing", uri)


def test_new_local_folders_are_synced_into_their_parents(storage, tmp_path, monkeypatch):
    """A file synced into a folder whose own entry was never synced can vanish with the folder in
    a power loss: every folder a write or a move creates is synced in its parent, and each
    rename in its folder."""
    from pipeline import local_files

    synced: list[str] = []
    real = local_files.fsync_folder
    monkeypatch.setattr(local_files, "fsync_folder", lambda folder: (synced.append(folder), real(folder)))
    storage.write_bytes_atomic(str(tmp_path / "out" / "data" / "a.json"), b"{}")
    assert synced == [str(tmp_path), str(tmp_path / "out"), str(tmp_path / "out" / "data")]
    synced.clear()
    monkeypatch.setattr("pipeline.storage.fsync_folder", local_files.fsync_folder)
    storage.move(str(tmp_path / "out" / "data" / "a.json"), str(tmp_path / "out" / "aside" / "a.json"))
    assert synced == [str(tmp_path / "out"), str(tmp_path / "out" / "aside"), str(tmp_path / "out" / "data")]


def test_s3_bytes_roundtrip_exists_delete(storage, s3_bucket):
    uri = f"s3://{s3_bucket}/runs/summary.json"
    assert not storage.exists(uri)
    storage.write_bytes_atomic(uri, b"{}")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"{}"
    storage.delete(uri)
    storage.delete(uri)
    assert not storage.exists(uri)


def test_missing_object_error_names_the_uri(storage, s3_bucket):
    uri = f"s3://{s3_bucket}/no/such.mp4"
    calls = [(storage.read_bytes, uri), (storage.read_parquet, uri + ".parquet"),
             (lambda u: storage.local_copy(u, "/tmp/unused"), uri)]
    for call, arg in calls:
        with pytest.raises(StorageError) as info:
            call(arg)
        assert (info.value.kind, info.value.uri) == ("missing", arg) and arg in str(info.value)


def part_table(start: int, rows: int) -> pa.Table:
    return pa.table({"clip_id": [f"c{i}" for i in range(start, start + rows)],
                     "status": ["ok"] * rows})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parquet_written_atomically_and_read_back_without_partition_columns(
        storage, s3_bucket, tmp_path, where):
    root = f"s3://{s3_bucket}/out" if where == "s3" else str(tmp_path / "out")
    first = f"{root}/data/job=caption/run_date=2025-01-01/part-r1-0.parquet"
    second = f"{root}/data/job=caption/run_date=2025-01-02/part-r2-0.parquet"
    storage.write_parquet_atomic(part_table(0, 3), first)
    storage.write_parquet_atomic(part_table(3, 2), second)

    filesystem, path = storage.arrow_filesystem(first)
    assert isinstance(filesystem, pafs.S3FileSystem if where == "s3" else pafs.LocalFileSystem)
    assert pq.read_table(path, filesystem=filesystem).equals(part_table(0, 3))
    table = storage.read_parquet(f"{root}/data")
    assert table.column_names == ["clip_id", "status"]  # no job=/run_date= columns added
    assert table.column("clip_id").to_pylist() == [f"c{i}" for i in range(5)]
    assert storage.read_parquet(f"{root}/data", columns=["status"]).column_names == ["status"]
    assert storage.list_files(root) == [first, second]  # nothing else (no temp objects/files)


def test_read_parquet_empty_prefix_and_mixed_schemas(storage, s3_bucket):
    root = f"s3://{s3_bucket}/out"
    empty = storage.read_parquet(root, columns=["clip_id", "status"])
    assert (empty.num_rows, empty.column_names) == (0, ["clip_id", "status"])
    storage.write_parquet_atomic(part_table(0, 1), f"{root}/part-0.parquet")
    storage.write_parquet_atomic(pa.table({"clip_id": ["e"], "error": ["boom"]}),
                                 f"{root}/part-0-errors.parquet")
    table = storage.read_parquet(root)
    assert sorted(table.to_pylist(), key=lambda r: r["clip_id"]) == [
        {"clip_id": "c0", "status": "ok", "error": None},
        {"clip_id": "e", "status": None, "error": "boom"}]
    with pytest.raises(StorageError, match=r"part-0-errors\.parquet.*'status'"):
        storage.read_parquet(root, columns=["clip_id", "status"])


# ---------------------------------------------------------------- node-local copies


def test_local_copy_downloads_once_and_refetches_a_changed_object(storage, s3, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/videos/a.mp4"
    s3.put_object(Bucket=s3_bucket, Key="videos/a.mp4", Body=b"v1")
    sent = count_sends(storage)

    first = storage.local_copy(uri, str(tmp_path))
    second = storage.local_copy(uri, str(tmp_path))

    assert first == second and first.endswith("/a.mp4")
    assert open(first, "rb").read() == b"v1"
    assert sent["GetObject"] == 1
    s3.put_object(Bucket=s3_bucket, Key="videos/a.mp4", Body=b"v2")
    third = storage.local_copy(uri, str(tmp_path))
    assert third != first and open(third, "rb").read() == b"v2" and sent["GetObject"] == 2


def test_local_copy_of_a_local_path(storage, tmp_path):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    assert storage.local_copy(str(video), str(tmp_path / "cache")) == str(video)
    with pytest.raises(StorageError) as info:
        storage.local_copy(str(tmp_path / "gone.mp4"), str(tmp_path / "cache"))
    assert info.value.kind == "missing" and "gone.mp4" in str(info.value)


def test_download_prefix_once_per_node_even_when_two_actors_race(s3_server, s3, s3_bucket, tmp_path):
    files = {"config.json": b"{}", "model.safetensors": b"w" * 100_000, "sub/tokenizer.json": b"t"}
    for name, body in files.items():
        s3.put_object(Bucket=s3_bucket, Key=f"models/tiny/{name}", Body=body)
    s3.put_object(Bucket=s3_bucket, Key="models/tiny-other/x", Body=b"not ours")
    actors = [Storage(StorageConfig(endpoint_url=s3_server)) for _ in range(2)]
    sends = [count_sends(a) for a in actors]
    target = str(tmp_path / "weights")
    barrier = threading.Barrier(2)

    def download(actor: Storage) -> str:
        barrier.wait()
        return actor.download_prefix(f"s3://{s3_bucket}/models/tiny", target)

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(download, actors)) == [target, target]
    assert sum(s["GetObject"] for s in sends) == len(files)
    for name, body in files.items():
        assert open(os.path.join(target, name), "rb").read() == body
    assert os.path.exists(os.path.join(target, COMPLETE_MARKER))
    before = sum(s["GetObject"] for s in sends)
    assert actors[0].download_prefix(f"s3://{s3_bucket}/models/tiny", target) == target
    assert sum(s["GetObject"] for s in sends) == before  # the marker's versions are current: one listing only
    with pytest.raises(StorageError) as info:
        actors[0].download_prefix(f"s3://{s3_bucket}/models/none", str(tmp_path / "w2"))
    assert info.value.kind == "missing"


def test_a_prefix_rewritten_since_its_mirror_is_mirrored_again(s3_server, s3, s3_bucket, tmp_path, caplog):
    """A retrained checkpoint: the same file names and sizes, other bytes, one shard fewer. The
    node's copy follows the prefix (ETags), never serves the old weights beside the new."""
    uri, target = f"s3://{s3_bucket}/models/v", str(tmp_path / "weights")
    for name, body in {"config.json": b"{}", "model-1.safetensors": b"old1", "model-2.safetensors": b"old2"}.items():
        s3.put_object(Bucket=s3_bucket, Key=f"models/v/{name}", Body=body)
    storage = Storage(StorageConfig(endpoint_url=s3_server))
    storage.download_prefix(uri, target)
    s3.put_object(Bucket=s3_bucket, Key="models/v/model-1.safetensors", Body=b"new1")
    s3.delete_object(Bucket=s3_bucket, Key="models/v/model-2.safetensors")
    sends = count_sends(storage)
    assert storage.download_prefix(uri, target) == target
    assert sends["GetObject"] == 1  # only the changed file
    assert open(os.path.join(target, "model-1.safetensors"), "rb").read() == b"new1"
    assert sorted(os.listdir(target)) == [COMPLETE_MARKER, ".v2drop-download.lock", "config.json", "model-1.safetensors"]
    # a listing that fails serves the complete copy, and says so
    offline = Storage(StorageConfig(endpoint_url="http://127.0.0.1:9", max_attempts=1, connect_timeout_s=1))
    with caplog.at_level(logging.WARNING, logger="pipeline.node_cache"):
        assert offline.download_prefix(uri, target) == target
    assert "cannot list" in caplog.text and "using the copy mirrored before" in caplog.text


# ---------------------------------------------------------------- failures over HTTP


def _post_moto_api(endpoint: str, path: str, data: bytes) -> None:
    # text/plain: with urllib's default form content type werkzeug eats the body (moto: 500)
    request = urllib.request.Request(f"{endpoint}{path}", data=data, method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).close()


def test_denied_request_is_kind_denied(s3_server, s3, s3_bucket, monkeypatch):
    """moto enforces IAM once auth is switched on: a user allowed only to list gets a real 403."""
    s3.put_object(Bucket=s3_bucket, Key="secret.mp4", Body=b"x")
    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"lister-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="list-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    storage = Storage(StorageConfig(endpoint_url=s3_server))
    uri = f"s3://{s3_bucket}/secret.mp4"
    _post_moto_api(s3_server, "/moto-api/reset-auth", b"0")  # enforce auth from now on
    try:
        assert storage.list_files(f"s3://{s3_bucket}") == [uri]
        with pytest.raises(StorageError, match="secret.mp4") as info:
            storage.read_bytes(uri)
    finally:
        _post_moto_api(s3_server, "/moto-api/reset-auth", b"inf")
    assert info.value.kind == "denied" and "AccessDenied" in info.value.reason


def test_throttling_is_retried_with_backoff(storage, s3, s3_bucket):
    s3.put_object(Bucket=s3_bucket, Key="a.mp4", Body=b"payload")
    sent = count_sends(storage)
    answer_first_requests(storage, times=2, status=503, body=SLOW_DOWN)
    assert storage.read_bytes(f"s3://{s3_bucket}/a.mp4") == b"payload"
    assert sent["GetObject"] == 3  # 503, 503, then the real answer from moto


def test_persistent_throttling_gives_up_as_transient(s3_server, s3_bucket):
    storage = Storage(StorageConfig(endpoint_url=s3_server, max_attempts=2))
    sent = count_sends(storage)
    answer_first_requests(storage, times=99, status=503, body=SLOW_DOWN)
    with pytest.raises(StorageError, match="a.mp4") as info:
        storage.read_bytes(f"s3://{s3_bucket}/a.mp4")
    assert info.value.kind == "transient" and sent["GetObject"] == 2


def test_a_body_broken_mid_stream_is_read_again(storage, s3, s3_bucket):
    s3.put_object(Bucket=s3_bucket, Key="a.mp4", Body=b"0123456789")
    sent = count_sends(storage)
    # 200 announcing 10 bytes but delivering 4: botocore does not retry a body read
    answer_first_requests(storage, times=1, status=200, body=b"0123",
                          headers={"Content-Length": "10"})
    assert storage.read_bytes(f"s3://{s3_bucket}/a.mp4") == b"0123456789"
    assert sent["GetObject"] == 2
