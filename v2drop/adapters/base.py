"""What the generic decoder loop needs to know about one model family.

An adapter is data plus a few small functions; the loop in `v2drop.loop` does the rest. Adding
a family is one row in `vlm.families` (what the project knows about it: classes, placeholder
tokens, the tiny builder's config) and one small file here that builds a `FamilyAdapter` (what
the engine needs: positions, per-layer additions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlm import families


def no_layer_additions(kwargs: dict, inputs_embeds: torch.Tensor) -> None:
    return None


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
    model_types: tuple[str, ...]  # config.model_type values this adapter accepts
    # (text_model, inputs_embeds, position_ids, cache) -> the position ids rotary_emb takes
    positions: Callable[..., torch.Tensor]
    # (text-forward kwargs, inputs_embeds) -> [B, L, K, D] or None: per-token inputs the family adds to
    # the residual stream after its first K layers. Pops the family's own kwargs, so the decoder
    # layers never receive them.
    layer_additions: Callable[[dict, torch.Tensor], torch.Tensor | None] = no_layer_additions

    def multimodal_model(self, model: nn.Module) -> nn.Module:
        """The module whose forward receives input_ids (a hook there records them)."""
        return model.model

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack whose forward v2drop replaces."""
        return model.model.language_model

    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        """Token ids whose positions hold visual features (image and video placeholders): the
        config keys are the family's row in `vlm.families`."""
        return families.visual_token_ids(model.config)


def default_positions(text_model, inputs_embeds, position_ids, cache):
    """1-D RoPE (Qwen2, Llama): positions continue from the cache when not given."""
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past
        position_ids = position_ids.unsqueeze(0)
    return position_ids.expand(inputs_embeds.shape[0], -1)
