"""What every benchmark shares: where results go, one timer (CUDA events on a GPU, wall clock on
CPU), one way to write a result as JSON plus the Markdown table it prints, and the recorded GPU
time of a clip that the CPU-side benchmarks set their figures beside."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPU_RUN = RESULTS_DIR / "model-cuda-7b.json"  # the whole-model benchmark's H200 run


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(milliseconds, fn's result); on CUDA the GPU time between two events after a sync."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), out
    begin = time.perf_counter()
    out = fn()
    return (time.perf_counter() - begin) * 1e3, out


def write(stem: Path, report: dict[str, Any], table: str, quiet: bool = False) -> None:
    """<stem>.json and <stem>.md, and (unless quiet) the table on stdout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(table)
    if quiet:
        return
    print(table)
    print(f"wrote {stem}.json and {stem}.md")


def gpu_ms_per_clip() -> tuple[float, str] | None:
    """The fastest V²Drop row of the recorded H200 run at its longest new-token count (the issue's
    clip: 256 new tokens): (ms per clip, what it is); None without the file."""
    if not GPU_RUN.exists():
        return None
    run = json.loads(GPU_RUN.read_text())
    longest = max(r["new_tokens"] for r in run["rows"])
    best = min((r for r in run["rows"] if r["variant"] == "v2drop" and r["new_tokens"] == longest),
               key=lambda r: r["total_ms_per_clip"])
    return best["total_ms_per_clip"], (f"{run['hardware']}, Qwen2.5-VL-7B shapes, V²Drop 25 %, {best['engine']} engine, "
                                       f"batch {best['batch']}, {best['new_tokens']} new tokens, {GPU_RUN.name}")
