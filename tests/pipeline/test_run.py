"""pipeline.run end to end on a real local Ray cluster: every input accounted for, resume, S3, CLI.

The accounting tests run stage 5 with `FrameStatsStage` (tests/pipeline/stand_ins.py), an actor that
keeps the VideoModelWorker's row contract but answers with frame statistics, so that dozens of
clips of bookkeeping take seconds.
The real tiny Qwen2.5-VL (random weights) runs stage 5 in `test_real_tiny_model_captions_and_answers`,
in the S3 job, and in `ray job submit` of both job files. The CLI tests use inputs that never
reach the model (too short or broken).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline._write import job_data_uri
from pipeline.config import load_job, with_absolute_paths
from pipeline.run import ModelLoadError, run
from pipeline.schema import FILE_SCHEMA, PARTITIONING_SCHEMA, ROW_SCHEMA
from pipeline.storage import Storage
from tests.pipeline.stand_ins import CrashOnceStage, FrameStatsStage

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
# --- inputs ---------------------------------------------------------------------------------


def make_video(path: Path, codec: str, seconds: float, fps: int, width: int, height: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.full((height, width, 3), (i * 7) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, shared_videos: Path) -> Path:
    """The shared samples plus the everyday failures, made here."""
    folder = tmp_path_factory.mktemp("videos")
    for name in ("nasa_13013.mp4", "flipping_a_pancake.mkv", "h265_video.mp4", "video_90.mov", "corrupted.mp4"):
        (folder / name).symlink_to(shared_videos / name)
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "cut.mp4").write_bytes((shared_videos / "nasa_13013.mp4").read_bytes()[:200_000])
    (folder / "random.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    (folder / "notes.mp4").write_text("this is a text file, not a video\n")
    make_video(folder / "long.mp4", "libx264", 150, 1, 64, 48)  # 2.5 minutes -> 30 clips of 5 s
    make_video(folder / "av1.webm", "libsvtav1", 6, 4, 64, 64)  # decord2 reads AV1 (decord 0.6 could not)
    make_video(folder / "thin.mp4", "libx264", 3, 4, 1680, 8)  # the model refuses this clip
    return folder


EXPECTED = {  # file -> (rows by status, error stage)
    "nasa_13013.mp4": ({"ok": 3}, None),
    "flipping_a_pancake.mkv": ({"ok": 2}, None),
    "long.mp4": ({"ok": 30}, None),
    "av1.webm": ({"ok": 1}, None),  # [0, 5) s; the 1 s tail is below min_clip_len_s
    "h265_video.mp4": ({"ok": 1}, None),  # 1.0 s, shorter than min_clip_len_s: one clip of all of it
    "video_90.mov": ({"ok": 1}, None),  # 0.1 s, 3 frames
    "corrupted.mp4": ({"ok": 1}, None),  # served from the frames before the damage: partial_reason says so
    "zero.mp4": ({"error": 1}, "probe"),
    "cut.mp4": ({"error": 1}, "probe"),  # cut before the moov atom
    "random.mp4": ({"error": 1}, "probe"),
    "notes.mp4": ({"error": 1}, "probe"),
    "thin.mp4": ({"error": 1}, "model"),
}


def offline(job: str, tmp: Path, *overrides: str):
    return with_absolute_paths(load_job(JOBS / job, ["preset=offline", f"output.uri={tmp}", *overrides]))


def read_rows(output: str | Path) -> pa.Table:
    dataset = ds.dataset(str(output) + "/data", partitioning=ds.partitioning(PARTITIONING_SCHEMA, flavor="hive"))
    return dataset.to_table()


def data_files(output: Path) -> list[Path]:
    return sorted((output / "data").rglob("*.parquet"))


def by_file(rows: pa.Table) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for uri, status in zip(rows["video_uri"].to_pylist(), rows["status"].to_pylist()):
        counts.setdefault(Path(uri).name, {}).setdefault(status, 0)
        counts[Path(uri).name][status] += 1
    return counts


def assert_unique_keys(rows: pa.Table) -> None:
    keys = list(zip(rows["clip_id"].to_pylist(), rows["prompt"].to_pylist()))
    assert len(keys) == len(set(keys))


# --- caption: every input, resume -----------------------------------------------------------


@pytest.fixture(scope="module")
def caption_run(ray_cluster: None, videos: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Any]:
    out = tmp_path_factory.mktemp("caption-out")
    cfg = offline("caption.yaml", out, f"input.uri={videos}")
    return out, run(cfg, model_stage=FrameStatsStage), cfg


def test_every_input_is_accounted_for(caption_run: tuple[Path, dict, Any], videos: Path) -> None:
    out, summary, _ = caption_run
    rows = read_rows(out)
    assert rows.schema.remove_metadata() == pa.schema([*FILE_SCHEMA, *PARTITIONING_SCHEMA])
    assert set(rows.schema.names) == set(ROW_SCHEMA.names)
    assert by_file(rows) == {name: counts for name, (counts, _) in EXPECTED.items()}
    for row in rows.to_pylist():
        name = Path(row["video_uri"]).name
        if row["status"] != "ok":
            assert row["error_stage"] == EXPECTED[name][1] and str(videos / name) in row["error"], row
        run_id = summary["run_id"]  # e.g. 20261121T143212Z-742627, written on 2026-11-21
        assert (row["job"], row["run_id"], row["run_date"]) == ("caption", run_id, dt.date(int(run_id[:4]), int(run_id[4:6]), int(run_id[6:8])))
    assert_unique_keys(rows)
    decoders = {Path(u).name: d for u, d in zip(rows["video_uri"].to_pylist(), rows["decoder"].to_pylist()) if d}
    assert decoders["av1.webm"] == "decord" and decoders["nasa_13013.mp4"] == "decord"
    assert "zero.mp4: file is empty" in " ".join(e for e in rows["error"].to_pylist() if e)
    partial = {Path(r["video_uri"]).name: r for r in rows.to_pylist() if r["partial_reason"]}
    assert list(partial) == ["corrupted.mp4"]  # the frames before the damage serve their clip, and say so
    damaged = partial["corrupted.mp4"]
    assert damaged["partial_reason"].startswith(str(videos / "corrupted.mp4")) and "2 of 4 frames" in damaged["partial_reason"]
    assert damaged["start_s"] <= damaged["last_frame_s"] < damaged["end_s"] and damaged["output_text"].startswith("2 frames")
    whole = [r for r in rows.to_pylist() if r["status"] == "ok" and not r["partial_reason"]]
    assert all(r["start_s"] <= r["last_frame_s"] < r["end_s"] for r in whole)


def test_errors_go_to_their_own_files(caption_run: tuple[Path, dict, Any]) -> None:
    out, _, _ = caption_run
    for path in data_files(out):
        statuses = set(pq.read_table(path, columns=["status"])["status"].to_pylist())
        assert statuses == {"error"} if path.name.endswith("-errors.parquet") else statuses <= {"ok", "skipped"}
        assert path.parent.name.startswith("run_date=") and path.parent.parent.name == "job=caption"


def test_show_prints_where_the_output_is_the_counts_and_a_partial_row(caption_run: tuple[Path, dict, Any],
                                                                      capsys: pytest.CaptureFixture) -> None:
    from pipeline.show import show

    out, summary, _ = caption_run
    assert show(str(out), "caption", rows=60) == 0
    printed = capsys.readouterr().out
    assert f"{out}/data/job=caption  ({summary['rows_ok'] + summary['rows_error'] + summary['rows_skipped']} rows" in printed
    assert f"{summary['run_id']}  rows by status: {{'ok': 39, 'error': 5, 'skipped': 0}}, partial clips: 1" in printed
    [damaged] = [line for line in printed.splitlines() if "corrupted.mp4" in line]
    assert '"partial_reason"' in damaged and '"error"' not in damaged  # null fields are left out


def test_summary_agrees_with_the_rows(caption_run: tuple[Path, dict, Any]) -> None:
    out, summary, cfg = caption_run
    rows = read_rows(out).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    stored = json.loads((out / "runs" / "job=caption" / summary["run_id"] / "summary.json").read_text())
    assert stored == json.loads(json.dumps(summary, default=str))
    assert (summary["rows_ok"], summary["rows_error"], summary["rows_skipped"]) == (39, 5, 0)
    assert summary["errors_by_stage"] == {"model": 1, "probe": 4}
    assert summary["clips_partial"] == 1  # corrupted.mp4
    [partial] = [r for r in ok if r["partial_reason"]]
    assert partial["last_frame_s"] < partial["end_s"]
    seen_s = sum((r["last_frame_s"] if r["partial_reason"] else r["end_s"]) - r["start_s"] for r in ok)
    assert summary["video_seconds_processed"] == pytest.approx(seen_s)  # a partial clip counts up to its last frame
    assert summary["output_tokens"] == sum(r["output_tokens"] for r in ok)
    assert summary["clips_per_s"] == pytest.approx(len(ok) / summary["wall_s"])
    assert summary["accelerator"] == "cpu" and summary["video_hours_per_gpu_hour"] is None
    assert summary["video_hours_per_cpu_hour"] == pytest.approx(summary["video_seconds_processed"] / 3600 / (summary["wall_s"] / 3600 * 2))
    assert summary["flops_saved_fraction"] == pytest.approx(0.7)
    config = (out / "runs" / "job=caption" / summary["run_id"] / "config.yaml").read_text()
    [stored_row] = pq.read_table(out / "summaries" / "job=caption" / f"run_date={summary['run_date']}"
                                 / f"summary-{summary['run_id']}.parquet").to_pylist()
    assert "tiny:qwen2_5_vl" in config and stored_row["rows_ok"] == 39 and dict(stored_row["errors_by_stage"]) == {"model": 1, "probe": 4}


def test_resume_writes_nothing_new_then_retries_only_what_is_missing(caption_run: tuple[Path, dict, Any]) -> None:
    out, first, cfg = caption_run
    before = read_rows(out)
    errors_before = [p for p in data_files(out) if p.name.endswith("-errors.parquet")]

    again = run(cfg, model_stage=FrameStatsStage)  # only the 5 error keys are retried, and fail again
    assert (again["rows_ok"], again["rows_skipped"], again["rows_error"]) == (0, 0, 5)
    assert not any(p.exists() for p in errors_before)  # replaced by this run's error file
    rows = read_rows(out)
    assert rows.num_rows == before.num_rows
    assert_unique_keys(rows)

    # Lose the part file, and inject an error file claiming a finished key failed: both retried.
    part = next(p for p in data_files(out) if not p.name.endswith("-errors.parquet"))
    lost = pq.read_table(part)
    part.unlink()
    injected = lost.filter(pc.equal(lost["status"], "ok")).slice(0, 1)
    pq.write_table(injected.set_column(injected.schema.get_field_index("status"), "status", pa.array(["error"])),
                           part.with_name("part-injected-00000-errors.parquet"))
    third = run(cfg, model_stage=FrameStatsStage)
    assert third["rows_ok"] + third["rows_skipped"] == lost.num_rows
    rows = read_rows(out)
    assert rows.num_rows == before.num_rows
    assert_unique_keys(rows)
    assert by_file(rows) == {name: counts for name, (counts, _) in EXPECTED.items()}


@pytest.mark.parametrize("change", ["model.retention=0.5", "model.dtype=bfloat16"])
def test_resume_redoes_rows_of_another_engine_configuration_once(caption_run: tuple[Path, dict, Any], change: str) -> None:
    """Rows written with another model/engine configuration are not 'done': they are redone and
    replaced, never duplicated (workers.provenance.engine_fingerprint)."""
    from pipeline._model import run_fingerprint

    out, _, cfg = caption_run
    before = read_rows(out)
    changed = offline("caption.yaml", out, f"input.uri={cfg.input.uri}", change)
    summary = run(changed, model_stage=FrameStatsStage)
    assert summary["rows_ok"] == sum(counts.get("ok", 0) for counts, _ in EXPECTED.values())
    rows = read_rows(out)
    assert rows.num_rows == before.num_rows
    assert_unique_keys(rows)
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    assert set(ok["engine_fingerprint"].to_pylist()) == {run_fingerprint(changed)} != {run_fingerprint(cfg)}
    assert summary["engine_fingerprint"] == run_fingerprint(changed)


def test_a_crashed_actor_is_restarted_and_loses_or_duplicates_nothing(ray_cluster: None, videos: Path,
                                                                      tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    cache.mkdir()
    summary = run(offline("caption.yaml", out, f"input.uri={videos}", f"model.cache_dir={cache}"),
                  model_stage=CrashOnceStage)
    assert (cache / "crashed-once").exists()  # the actor did die mid-run
    rows = read_rows(out)
    assert by_file(rows) == {name: counts for name, (counts, _) in EXPECTED.items()}
    assert_unique_keys(rows)
    assert (summary["rows_ok"], summary["rows_error"], summary["rows_skipped"]) == (39, 5, 0)


# --- qa, manifest ---------------------------------------------------------------------------


def test_qa_manifest_gives_one_row_per_question(ray_cluster: None, shared_videos: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "videos.jsonl"
    lines = [{"uri": str(shared_videos / "nasa_13013.mp4"), "questions": ["Is it night?"], "source": "nasa"},
             {"uri": str(tmp_path / "missing.mp4"), "source": "lost"}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    cfg = offline("qa.yaml", tmp_path / "out", f"input.uri={manifest}")
    run(cfg, model_stage=FrameStatsStage)
    rows = read_rows(tmp_path / "out").to_pylist()
    nasa = [r for r in rows if r["video_uri"].endswith("nasa_13013.mp4")]
    assert len(nasa) == 3 * 4  # 3 clips x (3 configured questions + the manifest's own)
    assert {r["prompt"] for r in nasa} == {*cfg.prompt.questions, "Is it night?"}
    assert dict(nasa[0]["metadata"]) == {"source": "nasa"}
    missing = [r for r in rows if r["video_uri"].endswith("missing.mp4")]
    assert len(missing) == 1 and missing[0]["status"] == "error" and "missing.mp4: no such file" in missing[0]["error"]
    assert_unique_keys(read_rows(tmp_path / "out"))


# --- S3 -------------------------------------------------------------------------------------


def test_input_and_output_on_s3(ray_cluster: None, s3_server: str, s3_bucket: str, shared_videos: Path) -> None:
    """The caption job with the real tiny model, reading and writing over HTTP S3; resume reads
    the keys back from S3; a manifest on S3 naming a missing object gets an error row naming it."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for name in ("nasa_13013.mp4", "h265_video.mp4"):
        client.upload_file(str(shared_videos / name), s3_bucket, f"raw/{name}")

    def job(input_uri: str, output_prefix: str):
        return with_absolute_paths(load_job(JOBS / "caption.yaml", [
            "preset=offline", f"input.uri={input_uri}", f"output.uri=s3://{s3_bucket}/{output_prefix}",
            f"storage.endpoint_url={s3_server}"]))

    cfg = job(f"s3://{s3_bucket}/raw", "captions")
    summary = run(cfg)
    assert (summary["rows_ok"], summary["rows_skipped"], summary["rows_error"]) == (4, 0, 0)  # h265: one 1 s clip
    assert summary["model_random_weights"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="captions/")["Contents"]]
    assert sum(k.startswith("captions/data/job=caption/run_date=") and k.endswith(".parquet") for k in keys) == 1
    assert {k.rsplit("/", 1)[1] for k in keys if "/runs/" in k} == {"config.yaml", "summary.json", "report.html"}
    assert sum("/summaries/job=caption/run_date=" in k and k.endswith(".parquet") for k in keys) == 1
    assert run(cfg)["planned_rows"] == 0  # resume reads the keys back from S3: nothing is run twice

    manifest = "\n".join(json.dumps({"uri": uri}) for uri in ("nasa_13013.mp4", f"s3://{s3_bucket}/raw/gone.mp4"))
    client.put_object(Bucket=s3_bucket, Key="raw/videos.jsonl", Body=manifest.encode())
    listed = job(f"s3://{s3_bucket}/raw/videos.jsonl", "from-manifest")
    run(listed, model_stage=FrameStatsStage)
    storage = Storage(listed.storage)
    rows = storage.read_parquet(job_data_uri(listed.output.uri, listed.job))
    assert by_file(rows) == {"nasa_13013.mp4": {"ok": 3}, "gone.mp4": {"error": 1}}
    [gone] = [r for r in rows.to_pylist() if r["status"] == "error"]
    assert gone["error"].startswith(f"s3://{s3_bucket}/raw/gone.mp4") and "missing" in gone["error"]


# --- the real model -------------------------------------------------------------------------


def test_model_that_cannot_load_is_a_systemic_error(ray_cluster: None, shared_videos: Path, tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()  # a folder (a missing one is refused before Ray: test_preflight)
    cfg = offline("caption.yaml", tmp_path / "out", f"input.uri={shared_videos / 'nasa_13013.mp4'}",
                  f"model.source={tmp_path / 'empty-model'}")
    with pytest.raises(ModelLoadError, match="could not be loaded by any actor"):
        run(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny:qwen2_5_vl", "tiny:qwen3_vl"])
def test_real_tiny_model_captions_and_answers(ray_cluster: None, videos: Path, tmp_path: Path, model: str) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("nasa_13013.mp4", "av1.webm", "thin.mp4", "h265_video.mp4", "corrupted.mp4"):
        (folder / name).symlink_to(videos / name)
    summary = run(offline("qa.yaml", tmp_path / "out", f"input.uri={folder}", f"model.source={model}"))
    rows = read_rows(tmp_path / "out").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    # (nasa_13013: 3 clips, av1: 1, corrupted: 1, h265_video: 1 clip of its whole 1 s) x 3 questions; thin fails
    assert len(ok) == (3 + 1 + 1 + 1) * 3
    damaged = [r for r in ok if r["video_uri"].endswith("corrupted.mp4")]
    assert len(damaged) == 3 and all(r["partial_reason"] and r["last_frame_s"] < r["end_s"] for r in damaged)
    assert all(r["model_random_weights"] and r["output_tokens"] >= 1 and r["model_id"] == model for r in ok)
    assert all(r["visual_tokens_per_stage"] and r["retention_achieved"] < 1 for r in ok)
    assert all(r["video_prefill_shared"] and r["video_prefill_unshared_reason"] is None for r in ok)  # one per clip
    thin = [r for r in rows if r["video_uri"].endswith("thin.mp4")]
    assert thin and all(r["status"] == "error" and r["error_stage"] == "model" for r in thin)
    assert summary["rows_ok"] == len(ok)


# --- CLI: shebang and ray job submit ---------------------------------------------------------


def cli_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def short_videos(tmp_path_factory: pytest.TempPathFactory, shared_videos: Path) -> Path:
    """Videos shorter than clips.min_clip_len_s (each one clip of its whole length, through the
    real tiny model) and an empty file (a probe error)."""
    folder = tmp_path_factory.mktemp("short")
    for name in ("h265_video.mp4", "video_90.mov"):
        (folder / name).symlink_to(shared_videos / name)
    (folder / "zero.mp4").write_bytes(b"")
    return folder


@pytest.mark.slow
def test_job_file_runs_as_a_script(short_videos: Path, tmp_path: Path) -> None:
    result = subprocess.run([str(JOBS / "caption.yaml"), "preset=offline", f"input.uri={short_videos}", "output.uri=out"],
                            cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resolved config" in result.stdout and "run summary" in result.stdout
    rows = read_rows(tmp_path / "out")
    assert by_file(rows) == {"h265_video.mp4": {"ok": 1}, "video_90.mov": {"ok": 1}, "zero.mp4": {"error": 1}}
    assert all(r["output_text"] for r in rows.to_pylist() if r["status"] == "ok")


@pytest.mark.slow
def test_cli_exit_codes(tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "pipeline", str(JOBS / "caption.yaml"), "model.retention=1.5"],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "model.retention: must be in (0, 1]" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "pipeline", str(JOBS / "caption.yaml"), f"input.uri={tmp_path}/nope"],
                             env=cli_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "input.uri:" in missing.stderr and "does not exist" in missing.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit(shared_videos: Path, tmp_path: Path) -> None:
    """Both job files through `ray job submit` to a cluster of the test's own, the real tiny model
    captioning or answering one clip: caption.yaml in the long form, qa.yaml in the short form,
    submitted together so that they share the cluster, as scheduled runs do."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "one_clip.mp4", "libx264", 5, 4, 64, 48)  # one 5 s clip under preset=offline
    (videos / "h265_video.mp4").symlink_to(shared_videos / "h265_video.mp4")  # 1 s: one clip of all of it
    # A throwaway local cluster: no token auth, so the CLI needs no token file; and no drain on
    # SIGTERM (Ray waits up to 30 s for a draining node: for Serve replicas, of which it has none).
    env = {**cli_env(), "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    ray_bin = shutil.which("ray", path=env["PATH"])
    dashboard = free_port()
    # Every port of its own: the session cluster already holds Ray's defaults, and a job agent that
    # cannot bind its port (52365) stays up without HTTP, so every submission is refused.
    ports = [f"--{name}={free_port()}" for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port", "metrics-export-port",
                                                    "ray-client-server-port")]
    # `ray start --block` stays in the foreground and stops what it started when signalled, so the
    # test ends exactly its own cluster (`ray stop` would end every Ray on the machine).
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", *ports, f"--dashboard-port={dashboard}",
                             "--dashboard-host=127.0.0.1", "--num-cpus=4",  # two jobs' actors and tasks at once
                             "--disable-usage-stats", "--include-dashboard=true"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    gcs = f"127.0.0.1:{ports[0].split('=')[1]}"
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_for_dashboard(address)
        jobs = (("caption", ["--", "python", "-m", "pipeline", "jobs/caption.yaml"], 1), ("qa", ["jobs/qa.yaml"], 3))
        submission_ids = {}
        for job, form, _ in jobs:
            result = submit_when_agent_is_up([ray_bin, "job", "submit", "--no-wait", "--address", address,
                                              "--working-dir", ".", *form, "preset=offline", f"input.uri={videos}",
                                              f"output.uri={tmp_path / job}"], env)
            assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
            submission_ids[job] = re.search(r"Job '(raysubmit_\w+)' submitted successfully", result.stdout).group(1)
        # Waiting and reading logs through Ray's job SDK, in this process: a `ray job` CLI call
        # spends seconds starting Python and importing Ray.
        client = JobSubmissionClient(address)
        for job, submission_id in submission_ids.items():
            status = wait_for_job(client, submission_id)
            assert status == JobStatus.SUCCEEDED, f"{job}: {status}\n{client.get_job_logs(submission_id)[-3000:]}"
        metadata = ray_job_metadata(gcs, env)
        for job, _, rows_per_clip in jobs:
            submission_id, out = submission_ids[job], tmp_path / job
            rows = read_rows(out)
            assert by_file(rows) == {"one_clip.mp4": {"ok": rows_per_clip}, "h265_video.mp4": {"ok": rows_per_clip}}
            ok = [r for r in rows.to_pylist() if r["status"] == "ok"]
            assert all(r["model_random_weights"] and r["output_text"] and r["retention_achieved"] < 1 for r in ok)
            assert len({r["prompt"] for r in ok}) == rows_per_clip
            [summary] = (out / "runs" / f"job={job}").glob("*/summary.json")
            summary = json.loads(summary.read_text())
            assert summary["rows_ok"] == 2 * rows_per_clip
            # the submission id in the summary, the run id in the Ray job's metadata
            assert summary["ray_job_submission_id"] == submission_id
            assert {"job_submission_id": submission_id, "v2drop_run_id": summary["run_id"], "v2drop_job": job}.items() \
                <= next(m for m in metadata if m.get("job_submission_id") == submission_id).items()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)


def ray_job_metadata(gcs_address: str, env: dict) -> list[dict[str, str]]:
    """Every Ray job's config metadata, read from the cluster's GCS in a process of its own (this
    one is connected to the session cluster)."""
    code = (f"import json, ray._raylet as r; c = r.GcsClient(address={gcs_address!r}); "
            "print(json.dumps([dict(i.config.metadata) for i in c.get_all_job_info().values()]))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_for_job(client: Any, submission_id: str, timeout_s: float = 400) -> Any:
    """The job's final status (or the one it has after `timeout_s`)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(submission_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                    JobStatus.STOPPED):
        if time.monotonic() > deadline:
            return status
        time.sleep(1)
    return status


def submit_when_agent_is_up(command: list[str], env: dict, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head answers "No available agent".

    The dashboard answers before the head's job agent has registered, and the head waits only
    10 s for it (Ray 2.60). Such a refusal creates no job, so submitting again cannot run the job
    twice. (An agent that could not bind its port is refused for ever: the deadline ends that.)
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(2)


def wait_for_dashboard(address: str, timeout_s: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:
            return  # up, and asking for Ray's auth token (which the ray CLI sends)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
