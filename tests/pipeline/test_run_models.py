"""pipeline.run end to end with real tiny models (random weights) in stage 5: Qwen2.5-VL and
Qwen3-VL answering questions, the caption job over HTTP S3, and a model that cannot load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline._write import job_data_uri
from pipeline.config import load_job, with_absolute_paths
from pipeline.run import ModelLoadError, run
from pipeline.storage import Storage
from tests.pipeline.runs import JOBS, by_file, offline, read_rows
from tests.pipeline.stand_ins import FrameStatsStage

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
