"""How many prompt rows one model call takes: at most `actors.batch_size`, fewer when the memory
model (`v2drop.memory`) says more would not fit the device memory left after loading.

The budget is `actors.memory_fraction` of the memory free on the GPU once the model is loaded,
or `actors.memory_budget_gib` when set (on any device; on CPU without it there is no budget).
The bytes of a row come from the token counts of the previous call (prompt tokens, visual tokens
before the first drop), through the V²Drop schedule: a dropped cache is smaller, so V²Drop gets
larger calls from the same budget. The first call of an actor takes FIRST_CALL_ROWS rows, to
learn the counts; an out-of-memory error still halves a call (workers.model_calls).

The memory model counts the call's decode engine and generate(), which decodes a call the static
engine fails. Example (Qwen2.5-VL-7B shapes, bf16, 2,048 visual and 49 text tokens, 256 new
tokens, 108 GiB budget, static engine): 442 MiB per row stock -> 250 rows per call; 358 MiB with
V²Drop at 25 % -> 308 (both generate()'s need).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from v2drop.memory import ModelShape, clip_bytes, clips_per_call
from v2drop.schedule import Schedule

log = logging.getLogger(__name__)
FIRST_CALL_ROWS = 4
GIB = 2**30


@dataclass
class CallSizer:
    shape: ModelShape
    schedule: Schedule | None  # None: the stock model
    engine: str  # the decode engine (v2drop.memory.ENGINES), GenerationConfig.engine()
    new_tokens: int  # generation.max_new_tokens: the cache is sized for all of them
    patches_per_visual_token: int  # vision-tower patches merged into one visual token
    budget_bytes: int | None  # None: no memory limit, only actors.batch_size
    row_bytes: int | None = None  # learned from the last call

    def rows_per_call(self, most: int) -> int:
        if self.budget_bytes is None:
            return most
        if self.row_bytes is None:
            return min(most, FIRST_CALL_ROWS)
        return clips_per_call(self.budget_bytes, self.row_bytes, most)

    def learn(self, token_counts: Sequence[tuple[int, int]]) -> None:
        """(prompt tokens, visual tokens) of each row of the last call; the largest row counts."""
        sizes = [clip_bytes(self.shape, self.schedule, prompt - visual, visual,
                            visual * self.patches_per_visual_token, self.new_tokens, self.engine)
                 for prompt, visual in token_counts]
        if sizes and max(sizes) != self.row_bytes:
            self.row_bytes = max(sizes)
            if self.budget_bytes is not None:
                log.info("model calls sized to %d rows (%.0f MiB per row, budget %.1f GiB)",
                         self.budget_bytes // self.row_bytes, self.row_bytes / 2**20, self.budget_bytes / GIB)


def memory_budget_bytes(device: torch.device, fraction: float, budget_gib: float | None) -> int | None:
    """`budget_gib` when given; on a GPU `fraction` of the memory free now (after loading); else None."""
    if budget_gib is not None:
        return int(budget_gib * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return None


def call_sizer(model: Any, schedule: Schedule | None, engine: str, new_tokens: int, budget_bytes: int | None) -> CallSizer:
    vision = model.config.vision_config
    merge = getattr(vision, "spatial_merge_size", None) or 2  # LLaVA-OneVision pools 2x2 too
    return CallSizer(ModelShape.from_config(model.config, model.dtype), schedule, engine, new_tokens, merge * merge,
                     budget_bytes)
