"""bench.bench_inputs at toy size: the table and the JSON it writes, and the recorded CPU run's
finding (building a clip's inputs on one CPU thread takes about as long as the clip's GPU time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import bench_inputs, report


def test_the_toy_run_measures_every_part_on_the_cpu_and_the_device(tmp_path: Path) -> None:
    result = bench_inputs.main(["--families", "qwen2_5_vl", "llava_onevision", "--sizes", "56x56", "84x140",
                                "--clips", "1", "2", "--frames", "4", "--threads", "1", "2", "--repeats", "1",
                                "--device", "cpu", "--out-dir", str(tmp_path)])
    rows = result["rows"]
    assert [(r["family"], r["size"], r["clips"]) for r in rows] == [
        (family, size, clips) for family in ("qwen2_5_vl", "llava_onevision") for size in ("56x56", "84x140")
        for clips in (1, 2)]
    for r in rows:
        assert min(r["rows_ms"], r["cpu_1t_ms"], r["cpu_2t_ms"], r["device_ms"]) > 0
        assert r["levels"] == 0  # the same device: the same bits
    # Qwen2.5-VL: 4 frames at 56x56 are 2 x 4 x 4 patches of 3 x 2 x 14 x 14 values per clip
    assert rows[0]["pixel_values_shape"] == [32, 1176] and rows[1]["pixel_values_shape"] == [64, 1176]
    assert rows[4]["pixel_values_shape"] == [1, 4, 3, 384, 384]  # LLaVA-OneVision: SigLIP's size
    table = (tmp_path / "inputs-cpu.md").read_text()
    assert "| family | frame size | clips per call | rows ms | CPU 1 thread ms | CPU 2 threads ms | cpu ms | levels |" in table
    assert table.count("| qwen2_5_vl |") == 4 and json.loads((tmp_path / "inputs-cpu.json").read_text())["rows"] == rows


def test_the_recorded_cpu_run_says_a_clips_inputs_cost_about_its_gpu_time() -> None:
    recorded = json.loads((report.RESULTS_DIR / "inputs-cpu.json").read_text())
    gpu_ms = recorded["gpu"]["ms_per_clip"]
    qwen = [r for r in recorded["rows"] if r["family"] == "qwen2_5_vl" and r["size"] == "448x448"]
    assert qwen and all(r["cpu_1t_ms"] > 0.5 * gpu_ms for r in qwen)


def test_the_gpu_runs_benchmarks_import_nothing_the_gpu_image_lacks() -> None:
    """bench/gpu_run.sh runs bench_inputs and bench_model on an image with torch, torchvision,
    transformers (carried), numpy and pyarrow, but no omegaconf, Ray, PyAV, decord or boto3: a
    stray import (bench_decode's pipeline.config, say) would fail there, on device time."""
    code = ("import sys, bench.bench_inputs, bench.bench_model; "
            "print(sorted(m for m in ('omegaconf', 'ray', 'av', 'decord', 'boto3', 'duckdb', 'polars') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
