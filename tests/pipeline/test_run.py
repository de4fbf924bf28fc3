"""pipeline.run end to end on a real local Ray cluster: every input accounted for, resume, crashes.

These run stage 5 with `FrameStatsStage` (tests/pipeline/stand_ins.py), an actor that keeps the
VideoModelWorker's row contract but answers with frame statistics, so that dozens of clips of
bookkeeping take seconds. The real tiny models run stage 5 in test_run_models.py and test_cli.py.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline._shard import settings_key, video_clip_id
from pipeline.run import run
from pipeline.schema import FILE_SCHEMA, PARTITIONING_SCHEMA, ROW_SCHEMA, SCHEMA_VERSION, schema_version
from tests.pipeline.runs import assert_unique_keys, by_file, data_files, offline, read_rows
from tests.pipeline.stand_ins import CrashOnceStage, FrameStatsStage

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
    assert decoders["av1.webm"] == "pyav" and decoders["nasa_13013.mp4"] == "pyav"  # auto's first choice
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

    older_summary = older_version_summary(out)
    again = run(cfg, model_stage=FrameStatsStage)  # only the 5 error keys are retried, and fail again
    assert (again["rows_ok"], again["rows_skipped"], again["rows_error"]) == (0, 0, 5)
    assert schema_version(pq.read_schema(older_summary)) == SCHEMA_VERSION  # summaries/ holds one schema again
    older_summary.unlink()
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
    # Errors of a whole video and of a whole clip that succeeded since (a probe or a read that
    # failed once): the next run removes them, though it writes neither key again.
    pq.write_table(stale_errors(before, "nasa_13013.mp4", settings_key(cfg)), part.with_name("part-r0-00000-errors.parquet"))
    third = run(cfg, model_stage=FrameStatsStage)
    assert third["rows_ok"] + third["rows_skipped"] == lost.num_rows
    rows = read_rows(out)
    assert rows.num_rows == before.num_rows
    assert_unique_keys(rows)
    assert by_file(rows) == {name: counts for name, (counts, _) in EXPECTED.items()}


def older_version_summary(out: Path) -> Path:
    """A summary file of schema version 3 (no inputs_device), of a run long before the others."""
    from pipeline.schema import SCHEMA_VERSION_KEY, SUMMARY_FILE_SCHEMA, conform

    path = out / "summaries" / "job=caption" / "run_date=2000-01-01" / "summary-20000101T000000Z-000000.parquet"
    path.parent.mkdir(parents=True)
    version_3 = pa.schema([f for f in SUMMARY_FILE_SCHEMA if f.name != "inputs_device"], metadata={SCHEMA_VERSION_KEY: b"3"})
    pq.write_table(conform({"run_id": ["20000101T000000Z-000000"]}, SUMMARY_FILE_SCHEMA).select(version_3.names).cast(version_3), path)
    return path


def stale_errors(rows: pa.Table, name: str, settings: str) -> pa.Table:
    """A probe error of the video `name` and a decode error of its first clip, as FILE_SCHEMA rows."""
    ok = next(r for r in rows.to_pylist() if r["video_uri"].endswith(name) and r["status"] == "ok")
    failed = {**{k: None for k in ok}, "video_uri": ok["video_uri"], "run_id": "r0", "prompt": "", "status": "error"}
    probe = {**failed, "clip_id": video_clip_id(ok["video_uri"], settings), "error_stage": "probe", "error": "timed out"}
    decode = {**failed, "clip_id": ok["clip_id"], "error_stage": "decode", "error": "read timed out"}
    return pa.Table.from_pylist([probe, decode], schema=FILE_SCHEMA)


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
