"""Qwen3-VL: Qwen2.5-VL's 3-D M-RoPE (interleaved inside its rotary_emb) plus DeepStack.

DeepStack adds visual features from several vision-encoder depths to the visual tokens' hidden
states after the first K decoder layers (transformers 5.23 `Qwen3VLTextModel._deepstack_process`).
Here those features become a per-token tensor that the loop gathers with the tokens, so a
token dropped before layer K simply takes its additions with it.
"""

from __future__ import annotations

import torch

from v2drop.adapters.base import FamilyAdapter
from v2drop.adapters.qwen2_5_vl import mrope_positions


def deepstack_additions(kwargs: dict, inputs_embeds: torch.Tensor) -> torch.Tensor | None:
    """[B, L, K, D]: level k's feature at each visual token (in `visual_pos_masks` order), else 0."""
    visual_pos_masks = kwargs.pop("visual_pos_masks", None)
    deepstack = kwargs.pop("deepstack_visual_embeds", None)
    if visual_pos_masks is None or not deepstack:
        return None
    batch, length, hidden = inputs_embeds.shape
    additions = inputs_embeds.new_zeros(batch, length, len(deepstack), hidden)
    features = torch.stack([level.to(inputs_embeds.device) for level in deepstack], dim=1)  # [N, K, D]
    additions[visual_pos_masks.to(inputs_embeds.device)] = features.to(inputs_embeds.dtype)
    return additions


QWEN3_VL = FamilyAdapter(
    name="Qwen3-VL",
    model_types=("qwen3_vl",),
    positions=mrope_positions,
    layer_additions=deepstack_additions,
)
