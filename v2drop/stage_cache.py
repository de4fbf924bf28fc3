"""The static decode engine's KV cache: a preallocated cache per V²Drop stage (v2drop.static_decode).

After the prefill, each layer's DynamicCache is copied into a `StageLayer` sized to that layer's
own prefill length plus the new tokens (after a V²Drop prefill the later stages are shorter).
Each stage has a key-valid buffer of the same length (False past what is written) and a one-slot
`write_at` buffer: the step sets it once per stage, and the stage's layers write there. Every
buffer is only mutated in place, so a captured CUDA graph may hold its address.

Worked example, 2 stages over 4 layers, prefill lengths (10, 4), 3 new tokens: layers 0-1 get
13-slot caches, layers 2-3 7-slot caches; step t writes slot 10 + t and 4 + t respectively.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, StaticLayer

from v2drop import api
from v2drop.loop import StageMasks


@dataclass
class StaticState:
    """Everything the captured step reads or mutates in place (fixed addresses)."""

    cache: Cache  # a StageLayer per decoder layer, sized per stage
    starts: list[int]  # first layer of each stage
    write_at: list[torch.Tensor]  # per stage [1] long: the slot this step writes; its layers hold it
    valid: list[torch.Tensor]  # per stage [B, prefill_len_s + max_new_tokens] bool
    prefill_lengths: torch.Tensor  # [num_stages] long: where step 0 writes in each stage
    next_positions: torch.Tensor  # [3, B, 1] (M-RoPE) or [B, 1]: rotary position of step 0's token
    seen: torch.Tensor | None = None  # [B, V] bool: each row's tokens so far, for a repetition penalty
    repetition_penalty: float = 1.0  # v2drop.greedy.penalize_repeats, when `seen` is set


def static_state(model, text_model, dynamic, positions: torch.Tensor, attention_mask, max_new_tokens: int) -> StaticState:
    """Copy a filled DynamicCache into per-layer StageLayers sized prefill + max_new_tokens."""
    stages = _stage_masks(model, dynamic, attention_mask, positions)
    write_at = [_static_address(torch.zeros(1, dtype=torch.long, device=positions.device)) for _ in stages.starts]
    layers = [StageLayer.filled(layer.keys, layer.values, layer.keys.shape[2] + max_new_tokens, write_at[s])
              for layer, s in zip(dynamic.layers, _stage_of_layers(stages.starts, len(dynamic.layers)))]
    valid = [torch.nn.functional.pad(m.bool(), (0, max_new_tokens), value=False) for m in stages.masks]
    state = StaticState(
        cache=Cache(layers=layers),
        starts=list(stages.starts),
        write_at=write_at,
        valid=valid,
        prefill_lengths=torch.tensor([m.shape[1] for m in stages.masks], device=positions.device),
        next_positions=(positions[..., -1:] + 1).contiguous(),
    )
    return state  # every buffer is only ever mutated in place: a captured step may hold its address


class StageLayer(StaticLayer):
    """A StaticLayer that writes each step's key and value at its stage's `write_at` slot, which
    the step sets once per stage, instead of advancing a counter of its own (StaticLayer's arange,
    add and add_ per layer and step: 84 of the ~1,230 kernels of a 28-layer step, 1 stage or 5).
    Its `cumulative_length` is not kept."""

    def __init__(self, max_cache_len: int, write_at: torch.Tensor) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.write_at = write_at

    @classmethod
    def filled(cls, keys: torch.Tensor, values: torch.Tensor, max_cache_len: int, write_at: torch.Tensor) -> StageLayer:
        """A layer of `max_cache_len` slots holding `keys`/`values` [B, H, L, D] in its first L."""
        layer = cls(max_cache_len, write_at)
        layer.lazy_initialization(keys, values)
        layer.keys[:, :, :keys.shape[2]] = keys
        layer.values[:, :, :values.shape[2]] = values
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.write_at, key_states)
        self.values.index_copy_(2, self.write_at, value_states)
        return self.keys, self.values


def _stage_of_layers(starts: list[int], num_layers: int) -> list[int]:
    """The stage of each layer: starts [0, 2] over 4 layers -> [0, 0, 1, 1]."""
    return [bisect_right(starts, layer) - 1 for layer in range(num_layers)]


def _static_address(buffer: torch.Tensor) -> torch.Tensor:
    """Tell torch.compile that `buffer` keeps its address (mutated in place), as StaticLayer does."""
    torch._dynamo.mark_static_address(buffer)
    return buffer


def select_rows(state: StaticState, index: torch.Tensor) -> StaticState:
    """A new state holding only the rows `index` ([b] long, positions in `state`'s batch), in new
    buffers: the old ones are freed once no step refers to them."""
    write_at = [_static_address(w.clone()) for w in state.write_at]
    layers = [StageLayer.filled(layer.keys[index], layer.values[index], layer.max_cache_len, write_at[s])
              for layer, s in zip(state.cache.layers, _stage_of_layers(state.starts, len(state.cache.layers)))]
    return StaticState(
        cache=Cache(layers=layers),
        starts=state.starts,
        write_at=write_at,
        valid=[v[index] for v in state.valid],
        prefill_lengths=state.prefill_lengths,
        next_positions=state.next_positions.index_select(-2, index),  # [3, B, 1] or [B, 1]
        seen=None if state.seen is None else state.seen[index],
        repetition_penalty=state.repetition_penalty,
    )


def _stage_masks(model, dynamic, attention_mask, positions) -> StageMasks:
    """The V²Drop per-stage key masks of this cache, or one stage over the prompt's mask (stock)."""
    state = getattr(model, api._STATE_ATTR, None)
    if state is not None and state.owns(dynamic) and state.stage_masks is not None:
        return StageMasks(starts=list(state.stage_masks.starts), masks=list(state.stage_masks.masks))
    batch, length = positions.shape[-2], dynamic.layers[0].keys.shape[2]
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.bool, device=positions.device)
    return StageMasks(starts=[0], masks=[attention_mask.to(device=positions.device, dtype=torch.bool)])
