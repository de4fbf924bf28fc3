"""Inputs shared by the end-to-end pipeline test modules (one copy per module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.runs import make_video


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

