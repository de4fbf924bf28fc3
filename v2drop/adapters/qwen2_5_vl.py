"""Qwen2.5-VL and Qwen2-VL (the same text model): 3-D M-RoPE positions (temporal, height, width)
for visual tokens.

Mirrors the position preamble of `Qwen2_5_VLTextModel.forward` (transformers 5.23): generate
passes [4, B, L] (text positions stacked on the 3-D ones); a direct call may pass [3, B, L],
[B, L] or nothing. The rotary cos/sin come from the 3-D ids; the text row is not needed, since
decoder layers read positions only through cos/sin (see v2drop.loop).
"""

from __future__ import annotations

import torch

from v2drop.adapters.base import FamilyAdapter


def mrope_positions(text_model, inputs_embeds, position_ids, cache):
    batch, length = inputs_embeds.shape[:2]
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(length, device=inputs_embeds.device) + past
        position_ids = position_ids.view(1, 1, -1).expand(3, batch, -1)
    elif position_ids.ndim == 2:
        position_ids = position_ids[None].expand(3, position_ids.shape[0], -1)
    if position_ids.shape[0] == 4:
        position_ids = position_ids[1:]
    return position_ids.expand(3, batch, -1)


QWEN2_5_VL = FamilyAdapter(
    name="Qwen2.5-VL / Qwen2-VL",
    model_types=("qwen2_5_vl", "qwen2_vl"),
    positions=mrope_positions,
)
