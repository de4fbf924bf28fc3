"""What every benchmark shares: one timer (CUDA events on a GPU, wall clock on CPU) and one way to
write its result as JSON plus the Markdown table it prints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


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
