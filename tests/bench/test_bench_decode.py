"""The decode benchmark at toy size: the real 480x270 sample and a small file it makes, both decoders.
Nothing here looks at how fast anything was; it checks what the table claims to measure."""

from __future__ import annotations

import json
from pathlib import Path

from bench import bench_decode
from bench.report import GPU_RUN
from pipeline.config import DecodeConfig
from pipeline.decoders import DECODERS
from pipeline.frame_sampling import fit_to_max_pixels


def test_every_source_and_decoder_gets_a_row_with_its_shrink_and_the_cores_per_gpu(tmp_path: Path) -> None:
    report = bench_decode.main(["--sizes", "480x270", "640x360", "--seconds", "4", "--repeats", "1",
                                "--out-dir", str(tmp_path)])
    assert report == json.loads((tmp_path / "decode-cpu.json").read_text())
    rows = {(r["source"], r["decoder"], r["threads"], r["reference_frames_only"]): r for r in report["rows"]}
    assert set(rows) == {(s, *setup) for s in ("480x270", "640x360") for setup in bench_decode.SETUPS}
    default = DecodeConfig()
    assert bench_decode.SETUPS[0] == (DECODERS[0], int(default.num_cpus), default.reference_frames_only)
    height, width = fit_to_max_pixels(360, 640, report["max_pixels"])
    for (source, *_), r in rows.items():
        assert r["frames"] == report["num_frames"] == 16 and r["clip_ms"] > 0 and r["clip_cpu_ms"] > 0
        if source == "480x270":  # the real sample, 13 s: clips [0, 10) and [10, 13); small enough already
            assert (r["file"], r["clips"], r["frame_size"], r["shrink_ms"]) == ("nasa_13013.mp4", 2, "480x270", 0.0)
        else:  # made here, 4 s: one clip, shrunk (the benchmark checked its shrink gives the decoded frames)
            assert (r["clips"], r["frame_size"], r["codec"]) == (1, f"{width}x{height}", "h264")
            assert r["shrink_ms"] > 0 and r["shrink_pil_ms"] > 0
    gpu = report["gpu"]  # the recorded H200 run: V²Drop's fastest clip at the longest new-token count
    recorded = json.loads(GPU_RUN.read_text())["rows"]
    longest = max(r["new_tokens"] for r in recorded)
    assert gpu["ms_per_clip"] == min(r["total_ms_per_clip"] for r in recorded
                                     if r["variant"] == "v2drop" and r["new_tokens"] == longest)
    one = rows["640x360", "pyav", 1, False]
    [line] = [line for line in (tmp_path / "decode-cpu.md").read_text().splitlines()
              if line.startswith("| 640x360 | synthetic_640x360.mp4 | pyav | 1 | no |")]
    assert line.endswith(f"| {one['clip_cpu_ms'] / gpu['ms_per_clip']:.1f} |")  # decode CPUs per GPU: CPU time
