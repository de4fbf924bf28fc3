"""Stage 1, discover (`pipeline._discover.discover`), on its own: real folders of the shared sample
videos and real manifests, no Ray. The end-to-end runs (test_run.py) cover it only through a whole job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline._discover import VIDEO_SCHEMA, discover
from pipeline.config import InputConfig
from pipeline.storage import Storage, StorageError


@pytest.fixture
def folder(tmp_path: Path, shared_videos: Path) -> Path:
    """Two real videos (one with an upper-case extension, one in a sub-folder), a dotfile, a text file."""
    (tmp_path / "sub").mkdir()
    shutil.copy(shared_videos / "h265_video.mp4", tmp_path / "b.MP4")
    shutil.copy(shared_videos / "video_90.mov", tmp_path / "sub" / "a.mov")
    shutil.copy(shared_videos / "h265_video.mp4", tmp_path / "._b.mp4")  # a macOS resource fork
    (tmp_path / "notes.txt").write_text("not a video")
    return tmp_path


def test_a_folder_gives_one_sorted_row_per_video_with_the_declared_schema(folder: Path) -> None:
    table = discover(InputConfig(uri=str(folder)), Storage())
    assert table.schema.equals(VIDEO_SCHEMA)
    assert table.to_pylist() == [
        {"video_uri": str(folder / "b.MP4"), "questions": [], "metadata_json": "{}"},
        {"video_uri": str(folder / "sub" / "a.mov"), "questions": [], "metadata_json": "{}"},
    ]


def test_limit_and_extensions_choose_the_videos(folder: Path) -> None:
    assert discover(InputConfig(uri=str(folder), limit=1), Storage())["video_uri"].to_pylist() == [str(folder / "b.MP4")]
    only_mov = discover(InputConfig(uri=str(folder), extensions=["MOV"]), Storage())
    assert only_mov["video_uri"].to_pylist() == [str(folder / "sub" / "a.mov")]


def test_a_manifest_brings_questions_and_metadata_and_a_repeated_video_once(folder: Path) -> None:
    manifest = folder / "list.jsonl"
    lines = [{"uri": "sub/a.mov", "questions": ["Who?", "Where?"], "camera": 3},
             {"uri": str(folder / "b.MP4"), "split": "test"},
             {"uri": "sub/a.mov", "questions": ["Ignored: the first row of a video wins"]},
             {"uri": "gone.mp4"}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    rows = discover(InputConfig(uri=str(manifest)), Storage()).to_pylist()
    assert [r["video_uri"] for r in rows] == [str(folder / "b.MP4"), str(folder / "gone.mp4"), str(folder / "sub" / "a.mov")]
    by_uri = {r["video_uri"]: r for r in rows}
    assert by_uri[str(folder / "sub" / "a.mov")]["questions"] == ["Who?", "Where?"]
    assert json.loads(by_uri[str(folder / "sub" / "a.mov")]["metadata_json"]) == {"camera": "3"}
    assert json.loads(by_uri[str(folder / "b.MP4")]["metadata_json"]) == {"split": "test"}
    # a missing file is kept: the probe stage turns it into an error row naming it
    assert by_uri[str(folder / "gone.mp4")]["questions"] == []


@pytest.mark.parametrize("content, reason", [
    (b"uri,questions,camera\nsub/a.mov,What happens, and why?,3\n", r"row 1 has 1 more cell\(s\) than the header names"),
    ("uri,questions\nsub/a.mov,Qu'est-ce qui se passe à l'écran ?\n".encode("latin-1"), "not UTF-8 text"),
])
def test_a_csv_manifest_that_cannot_be_read_as_written_is_refused_naming_it(folder: Path, content: bytes, reason: str) -> None:
    """An unquoted comma would cut the question short (and move the rest into a column named
    None); a Latin-1 file would be a traceback. Both are the manifest's error, by name."""
    manifest = folder / "list.csv"
    manifest.write_bytes(content)
    with pytest.raises(StorageError, match=reason) as raised:
        discover(InputConfig(uri=str(manifest)), Storage())
    assert raised.value.kind == "invalid" and str(manifest) in str(raised.value)


def test_a_missing_folder_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such file or folder") as raised:
        discover(InputConfig(uri=str(tmp_path / "nowhere")), Storage())
    assert raised.value.kind == "missing" and str(tmp_path / "nowhere") in str(raised.value)
