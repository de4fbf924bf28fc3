"""What one prefill did to each sample's visual tokens, in the output columns' vocabulary.

    marker = v2drop.stats_marker(model)          # before the call
    ... model(...) / model.generate(...)
    stats = v2drop.prefill_stats(model, input_ids, attention_mask, marker)   # one VisualStats per sample

`prefill_stats` covers the patched and the stock model alike, so every row means the same thing:
with V²Drop off (or when the call did not drop) each sample has one stage holding every visual
token, retention 1.0, and flops_dropped == flops_full (every layer sees the whole prompt).
`continued` adds a continuation over a prefilled cache: a question after a shared video prefill.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from v2drop import api
from v2drop.flops import TextShape, continuation_flops, prefill_flops
from vlm.families import visual_token_ids

logger = logging.getLogger("v2drop")


@dataclass(frozen=True)
class VisualStats:
    """One sample's prefill; the first four fields are output columns of the same names."""

    retention_achieved: float  # layer-averaged share of visual tokens kept; 1.0 when nothing dropped
    visual_tokens_per_stage: list[int]  # before the first drop layer, then after each
    flops_full: float  # analytic language-model FLOPs without dropping (v2drop.flops)
    flops_dropped: float  # ... with this call's drops
    cached_tokens_per_layer: list[int]  # tokens (text + kept visual) each layer's cache holds afterwards

    COLUMNS = ("retention_achieved", "visual_tokens_per_stage", "flops_full", "flops_dropped")

    def columns(self) -> dict[str, Any]:
        """The output columns this measures, by name."""
        return {name: getattr(self, name) for name in self.COLUMNS}


def stats_marker(model: Any) -> object | None:
    """The engine's current stats object, taken before a call: the engine stores a new list per
    dropping prefill, so the same object afterwards means the call did not drop."""
    return api.last_stats(model) if api.is_enabled(model) else None


def prefill_stats(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  marker: object | None) -> list[VisualStats]:
    """Per sample of the call that just ran on `input_ids` (left-padded, `attention_mask`)."""
    if api.is_enabled(model):
        samples = api.last_stats(model)
        if samples is not marker and len(samples) == input_ids.shape[0]:
            return [from_engine(sample) for sample in samples]
        logger.warning("v2drop is enabled but this call did not drop visual tokens; reporting full counts")
    return stock_stats(model, input_ids, attention_mask)


def from_engine(sample: Mapping[str, Any]) -> VisualStats:
    """One entry of `v2drop.last_stats` (the engine's detailed per-sample dict)."""
    return VisualStats(
        retention_achieved=float(sample["retention"]),
        visual_tokens_per_stage=[int(n) for n in sample["visual_tokens_per_stage"]],
        flops_full=float(sample["prefill_flops_full"]),
        flops_dropped=float(sample["prefill_flops"]),
        cached_tokens_per_layer=[int(sample["num_text_tokens"] + n) for n in sample["visual_tokens_per_layer"]],
    )


def stock_stats(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[VisualStats]:
    """The unpatched model: every layer sees every prompt token."""
    valid = attention_mask.bool()
    ids = torch.tensor(sorted(set(visual_token_ids(model.config))), device=input_ids.device)
    num_visual = (torch.isin(input_ids, ids) & valid).sum(dim=1).tolist()
    shape = TextShape.from_config(model.config.get_text_config())
    stats = []
    for visual, prompt in zip(num_visual, valid.sum(dim=1).tolist()):
        flops = prefill_flops(shape, [prompt] * shape.num_layers)
        stats.append(VisualStats(1.0, [int(visual)], flops, flops, [int(prompt)] * shape.num_layers))
    return stats


def continued(model: Any, prefill: VisualStats, new_tokens: int, sharers: int) -> VisualStats:
    """One of `sharers` continuations of a prefilled cache, with `new_tokens` of its own: an equal
    share of the prefill plus its tokens over the cache (full: the unpruned cache, which every
    layer would hold as layer 0 does; dropped: the pruned one)."""
    shape = TextShape.from_config(model.config.get_text_config())
    unpruned = [prefill.cached_tokens_per_layer[0]] * shape.num_layers
    return VisualStats(
        retention_achieved=prefill.retention_achieved,
        visual_tokens_per_stage=prefill.visual_tokens_per_stage,
        flops_full=prefill.flops_full / sharers + continuation_flops(shape, new_tokens, unpruned),
        flops_dropped=prefill.flops_dropped / sharers + continuation_flops(shape, new_tokens,
                                                                           prefill.cached_tokens_per_layer),
        cached_tokens_per_layer=[n + new_tokens for n in prefill.cached_tokens_per_layer],
    )

