"""What the end-to-end pipeline tests share: inputs made on the spot, job configs, reading the
rows back. Fixtures built from these live in tests/pipeline/conftest.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.config import load_job, with_absolute_paths
from pipeline.schema import PARTITIONING_SCHEMA

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"


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


def cli_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}

