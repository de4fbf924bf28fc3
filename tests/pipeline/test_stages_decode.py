"""Stage 4, decode (`decode_batch`), on its own: real sample videos through the real decoder
process and real Arrow tables, no Ray. What each clip row becomes: frames, a partial clip, an error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import _decode as _decode_module
from pipeline._decode import DECODED_SCHEMA, decode_batch
from pipeline._shard import CLIP_SCHEMA
from pipeline.config import DecodeConfig
from pipeline.storage import Storage
from pipeline.video import frames_from_record

DECODE = DecodeConfig(num_frames=4, max_pixels=64 * 64)


def _clip(uri: str, start_s: float, end_s: float, status: str = "ok") -> dict:
    return {"video_uri": uri, "questions": [], "metadata_json": "{}", "duration_s": end_s, "status": status,
            "error": None if status == "ok" else f"{uri}: earlier", "error_stage": None if status == "ok" else "probe",
            "clip_index": 0, "start_s": start_s, "end_s": end_s, "clip_id": f"id-{start_s}", "skip_reason": None}


def _decode(tmp_path: Path, *rows: dict) -> list[dict]:
    table = decode_batch(pa.Table.from_pylist(list(rows), schema=CLIP_SCHEMA), decode=DECODE, storage=Storage(),
                         cache_dir=str(tmp_path))
    assert table.schema.equals(DECODED_SCHEMA) and table.num_rows == len(rows)  # 1:1
    return table.to_pylist()


def test_a_clip_becomes_its_sampled_frames_as_bytes_shape_and_dtype(shared_videos: Path, tmp_path: Path) -> None:
    (row,) = _decode(tmp_path, _clip(str(shared_videos / "nasa_13013.mp4"), 2.0, 6.0))
    assert row["status"] == "ok" and row["partial_reason"] is None and row["decoder"] in ("decord", "pyav")
    frames = frames_from_record(row).frames
    assert frames.shape[0] == 4 and frames.shape[3] == 3 and frames.dtype == np.uint8
    assert frames.shape[1] * frames.shape[2] <= DECODE.max_pixels  # shrunk from 480x270
    assert row["frames_shape"] == list(frames.shape) and len(row["frames"]) == frames.size
    # midpoints of 4 bins of [2, 6): 2.5, 3.5, 4.5, 5.5 s, each the nearest frame at 29.97 fps
    assert row["timestamps_s"] == pytest.approx([2.5, 3.5, 4.5, 5.5], abs=1 / 29.97)
    assert row["last_frame_s"] == row["timestamps_s"][-1] and row["decode_ms"] > 0


def test_a_clip_of_a_damaged_file_is_served_from_the_frames_before_the_damage(shared_videos: Path, tmp_path: Path) -> None:
    """corrupted.mp4 decodes up to about 2 s: of [0, 5)'s 4 samples (0.625 ... 4.375 s) two are readable."""
    uri = str(shared_videos / "corrupted.mp4")
    (row,) = _decode(tmp_path, _clip(uri, 0.0, 5.0))
    assert row["status"] == "ok" and row["error"] is None and row["decoder"] == "pyav"
    assert row["partial_reason"].startswith(f"{uri}: clip [0, 5) s: 2 of 4 frames readable, up to ")
    assert len(row["timestamps_s"]) == 2 == row["frames_shape"][0] and row["last_frame_s"] < 2.5


def test_any_failure_decoding_a_clip_is_its_error_row_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    def broken(path, start_s, end_s, **kwargs):
        raise ValueError(f"need 0 <= start_s < end_s, got start_s={start_s}, end_s={end_s}")

    monkeypatch.setattr(_decode_module, "decode_clip", broken)
    monkeypatch.setattr(Storage, "local_copy", lambda self, uri, cache_dir: uri)
    (row,) = _decode(tmp_path, _clip("/v/a.mp4", 0.0, 0.0))
    assert row["status"] == "error" and row["error_stage"] == "decode"
    assert row["error"] == "/v/a.mp4: clip [0, 0) s: ValueError: need 0 <= start_s < end_s, got start_s=0.0, end_s=0.0"


def test_rows_that_are_not_ok_pass_through_and_a_missing_file_is_a_decode_error(tmp_path: Path) -> None:
    earlier = _clip("/v/broken.mp4", 0.0, 5.0, status="error")
    gone = _clip(str(tmp_path / "gone.mp4"), 0.0, 5.0)
    passed, missing = _decode(tmp_path, earlier, gone)
    assert passed["error"] == "/v/broken.mp4: earlier" and passed["error_stage"] == "probe" and passed["frames"] is None
    assert missing["status"] == "error" and missing["error_stage"] == "decode"
    assert missing["error"].startswith(str(tmp_path / "gone.mp4")) and "no such file" in missing["error"]
