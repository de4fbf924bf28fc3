"""V²Drop columns for each sample: retention, visual tokens per stage, prefill FLOPs.

With V²Drop on, they come from `v2drop.last_stats(model)`. With it off (retention 1.0), or when
the engine did not drop in this call, they are computed here from the token ids so the columns
mean the same thing in every row: one stage holding every visual token, retention 1.0, and the
analytic prefill FLOPs of `v2drop.flops` with every layer seeing the whole prompt
(flops_dropped == flops_full).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

import v2drop
from v2drop.flops import TextShape, prefill_flops
from vlm import families

log = logging.getLogger(__name__)


def stats_marker(model: Any) -> object | None:
    """The engine's current stats object, taken before generate: the engine stores a new list per
    dropping prefill, so the same object afterwards means this call did not drop."""
    return v2drop.last_stats(model) if v2drop.is_enabled(model) else None


def visual_stats(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, marker: object | None) -> list[dict]:
    """Per sample: retention_achieved, visual_tokens_per_stage, flops_full, flops_dropped."""
    if v2drop.is_enabled(model):
        stats = v2drop.last_stats(model)
        if stats is not marker and len(stats) == input_ids.shape[0]:
            return [engine_stats(sample) for sample in stats]
        log.warning("v2drop is enabled but this call did not drop visual tokens; reporting full counts")
    return stock_stats(model, input_ids, attention_mask)


def engine_stats(sample: dict) -> dict:
    return {
        "retention_achieved": float(sample["retention"]),
        "visual_tokens_per_stage": [int(n) for n in sample["visual_tokens_per_stage"]],
        "flops_full": float(sample["prefill_flops_full"]),
        "flops_dropped": float(sample["prefill_flops"]),
    }


def stock_stats(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[dict]:
    """Stats of the unpatched model: every layer sees every prompt token."""
    valid = attention_mask.bool()
    ids = torch.tensor(visual_token_ids(model), device=input_ids.device)
    num_visual = (torch.isin(input_ids, ids) & valid).sum(dim=1).tolist()
    shape = TextShape.from_config(model.config.get_text_config())
    stats = []
    for visual, prompt in zip(num_visual, valid.sum(dim=1).tolist()):
        flops = prefill_flops(shape, [prompt] * shape.num_layers)
        stats.append(
            {"retention_achieved": 1.0, "visual_tokens_per_stage": [int(visual)], "flops_full": flops, "flops_dropped": flops}
        )
    return stats


def visual_token_ids(model: Any) -> list[int]:
    """Image and video placeholder ids from the model config (the keys are the family's row)."""
    return sorted(set(families.visual_token_ids(model.config)))
