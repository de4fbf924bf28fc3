"""Stage-5 stand-ins for the pipeline tests: actors with the model stage's row contract
(`workers.rows`: pass non-ok rows through, one row per (clip, prompt), error rows for clips the
real processor refuses) that answer with frame statistics, so dozens of clips of bookkeeping take
seconds.

A Ray actor imports the module its class is defined in, so this one imports neither torch nor
transformers (nor the test modules, which import `pipeline.run`): about 9 s less per run's actor.
`tests/pipeline/test_columns.py` checks that it stays so.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline._output import to_output_table
from workers.model_inputs import decode_frames, prompts_for_row
from workers.rows import passthrough_row, rows_to_columns, utc_now

THIN_ASPECT = 200  # the Qwen processor refuses frames with an aspect ratio above this


class FrameStatsStage:
    """Stamps the driver's engine fingerprint, as the real stage does after checking its own."""

    def __init__(self, run_id: str, fingerprint: str, **model_stage_kwargs: Any) -> None:
        self.run_id, self.fingerprint, self.prompt_cfg = run_id, fingerprint, model_stage_kwargs["prompt"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        stamp = {"model_id": "frame-stats", "model_random_weights": False, "started_at": utc_now(), "finished_at": utc_now(),
                 "engine_fingerprint": self.fingerprint}
        out = []
        for row in batch.to_pylist():
            out += [passthrough_row(row)] if row["status"] != "ok" else answer(row, self.prompt_cfg, stamp)
        return to_output_table(rows_to_columns(out), self.run_id)


def answer(row: dict[str, Any], prompt_cfg: Any, stamp: dict[str, Any]) -> list[dict[str, Any]]:
    frames = decode_frames(row)
    base = {k: v for k, v in row.items() if k != "frames"} | stamp
    if max(frames.shape[1:3]) / min(frames.shape[1:3]) > THIN_ASPECT:  # what the real processor refuses
        return [base | {"status": "error", "error_stage": "model", "error": "ValueError: absolute aspect ratio must be smaller than 200"}]
    text = f"{frames.shape[0]} frames of {frames.shape[2]}x{frames.shape[1]}, mean {frames.mean():.1f}"
    return [base | {"prompt": p, "output_text": text, "status": "ok", "output_tokens": 4, "prompt_tokens": 40,
                    "retention_asked": 0.25, "retention_achieved": 0.25, "flops_full": 100.0, "flops_dropped": 30.0}
            for p in prompts_for_row(row, prompt_cfg)]


class SlowStage(FrameStatsStage):
    """FrameStatsStage taking a second per batch, so a run lasts long enough to be interfered with."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        time.sleep(1.0)
        return super().__call__(batch)


class CrashOnceStage(FrameStatsStage):
    """Kills its own actor process on its second batch, once per run (a marker file under
    model.cache_dir remembers it), as a segfault or an OOM kill would."""

    def __init__(self, run_id: str, fingerprint: str, **model_stage_kwargs: Any) -> None:
        super().__init__(run_id, fingerprint, **model_stage_kwargs)
        self.marker, self.batches = Path(model_stage_kwargs["model"].cache_dir) / "crashed-once", 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.batches += 1
        if self.batches == 2 and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)
