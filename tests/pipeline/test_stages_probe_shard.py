"""Stages 2 and 3, probe (`probe_batch`) and shard (`shard_batch`), each on its own with real sample
videos and real Arrow tables, no Ray: what each row becomes, error rows included."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline._discover import videos_table
from pipeline._probe import PROBED_SCHEMA, probe_batch
from pipeline._shard import CLIP_SCHEMA, settings_key, shard_batch
from pipeline.clips import clip_id
from pipeline.config import ClipsConfig, JobConfig, PromptConfig
from pipeline.storage import Storage

SETTINGS = settings_key(JobConfig())


def _videos(*uris: str) -> pa.Table:
    return videos_table([{"video_uri": u, "questions": [], "metadata_json": "{}"} for u in uris])


def _probed(uri: str, duration_s: float | None, status: str = "ok") -> dict:
    return {"video_uri": uri, "questions": [], "metadata_json": "{}", "duration_s": duration_s, "status": status,
            "error": None if status == "ok" else f"{uri}: broken", "error_stage": None if status == "ok" else "probe"}


def videos_with(*rows: dict) -> pa.Table:
    """Probed rows as the shard stage receives them."""
    return pa.Table.from_pylist(list(rows), schema=PROBED_SCHEMA)


def test_the_settings_key_names_what_changes_the_frames() -> None:
    """Part of every clip_id: the default keeps the key earlier runs wrote; reference frames only
    (other frames for the samples) gives other clip ids."""
    assert SETTINGS == "frames=16|fps=None|px=200704"
    reference = JobConfig()
    reference.decode.reference_frames_only = True
    assert settings_key(reference) == SETTINGS + "|reference-frames"


def test_probe_gives_each_readable_video_its_duration_and_each_bad_one_an_error_row(
        shared_videos: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("this is not a video\n" * 50)
    uris = [str(shared_videos / "nasa_13013.mp4"), str(tmp_path / "gone.mp4"), str(empty), str(text)]
    table = probe_batch(_videos(*uris), storage=Storage(), cache_dir=str(tmp_path / "cache"), timeout_s=30)
    assert table.schema.equals(PROBED_SCHEMA)
    rows = table.to_pylist()
    assert [r["video_uri"] for r in rows] == uris  # 1:1, in order
    assert rows[0]["status"] == "ok" and rows[0]["duration_s"] == pytest.approx(13.0, abs=0.05)
    assert rows[0]["error"] is None
    for row, reason in zip(rows[1:], ("no such file", "empty", "not a readable video")):
        assert row["status"] == "error" and row["error_stage"] == "probe" and row["duration_s"] is None
        assert row["error"].startswith(row["video_uri"]) and reason in row["error"]


def test_shard_cuts_a_probed_video_into_its_clips_with_deterministic_ids() -> None:
    uri = "/v/a.mp4"
    table = shard_batch(videos_with(_probed(uri, 13.0)), clips=ClipsConfig(clip_len_s=5, stride_s=5, min_clip_len_s=2),
                        settings=SETTINGS, prompt_cfg=PromptConfig(), done=set())
    assert table.schema.equals(CLIP_SCHEMA)
    spans = [(r["clip_index"], r["start_s"], r["end_s"]) for r in table.to_pylist()]
    assert spans == [(0, 0.0, 5.0), (1, 5.0, 10.0), (2, 10.0, 13.0)]
    assert table["clip_id"].to_pylist() == [clip_id(uri, s, e, SETTINGS) for _, s, e in spans]
    assert len(set(table["clip_id"].to_pylist())) == 3


def test_shard_leaves_out_clips_whose_every_prompt_is_done() -> None:
    uri, clips = "/v/a.mp4", ClipsConfig(clip_len_s=5, stride_s=5, min_clip_len_s=2)
    qa = PromptConfig(task="qa", questions=["Who?", "Where?"])
    first = clip_id(uri, 0.0, 5.0, SETTINGS)
    second = clip_id(uri, 5.0, 10.0, SETTINGS)
    done = {(first, "Who?"), (first, "Where?"), (second, "Who?")}  # the second clip still owes one answer
    table = shard_batch(videos_with(_probed(uri, 10.0)), clips=clips, settings=SETTINGS, prompt_cfg=qa, done=done)
    assert table["clip_id"].to_pylist() == [second]


def test_shard_passes_an_error_on_and_skips_a_video_of_no_duration() -> None:
    rows = [_probed("/v/broken.mp4", None, status="error"), _probed("/v/still.mp4", 0.0)]
    table = shard_batch(videos_with(*rows), clips=ClipsConfig(), settings=SETTINGS, prompt_cfg=PromptConfig(), done=set())
    broken, still = table.to_pylist()
    assert broken["status"] == "error" and broken["error"] == "/v/broken.mp4: broken"
    assert broken["clip_id"] == clip_id("/v/broken.mp4", 0.0, 0.0, SETTINGS)  # a key for the error row
    assert still["status"] == "skipped" and still["error"] is None
    assert "duration of 0 s" in still["skip_reason"] and still["skip_reason"].startswith("/v/still.mp4")
    # a skipped video already written is not planned again
    again = shard_batch(videos_with(rows[1]), clips=ClipsConfig(), settings=SETTINGS, prompt_cfg=PromptConfig(),
                        done={(still["clip_id"], "")})
    assert again.num_rows == 0


def test_figures_a_damaged_header_gives_are_planned_or_named_never_stop_the_run() -> None:
    """A duration below the clip plan's rounding is no span (skipped); one the plan refuses (the
    probe lets none through, plausible_duration) is the video's error row, the others go on."""
    rows = [_probed("/v/blink.mp4", 1e-7), _probed("/v/negative.mp4", -1.0), _probed("/v/fine.mp4", 3.0)]
    table = shard_batch(videos_with(*rows), clips=ClipsConfig(), settings=SETTINGS, prompt_cfg=PromptConfig(), done=set())
    blink, negative, fine = table.to_pylist()
    assert blink["status"] == "skipped" and fine["status"] == "ok"
    assert negative["status"] == "error" and negative["error_stage"] == "probe"
    assert negative["error"].startswith("/v/negative.mp4: the probe's figures cannot be planned into clips (ValueError")
    assert negative["clip_id"] == clip_id("/v/negative.mp4", 0.0, 0.0, SETTINGS)


def test_a_video_shorter_than_min_clip_len_is_one_clip_of_its_length(shared_videos: Path, tmp_path: Path) -> None:
    probed = probe_batch(_videos(str(shared_videos / "h265_video.mp4")), storage=Storage(),
                         cache_dir=str(tmp_path), timeout_s=30)
    table = shard_batch(probed, clips=ClipsConfig(), settings=SETTINGS, prompt_cfg=PromptConfig(), done=set())
    assert [(r["start_s"], r["end_s"]) for r in table.to_pylist()] == [(0.0, pytest.approx(1.0, abs=0.05))]
