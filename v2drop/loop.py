"""The generic decoder loop with progressive visual-token dropping.

Written against the text-model forward of transformers 5.23-5.24 (Qwen2_5_VLTextModel, Qwen2Model):
one visible loop over `text_model.layers`, rotary cos/sin computed once, masks built per layer
type. What changes here:

* Prefill that holds visual tokens: before each drop layer i, score the visual tokens by
  ||H[i] - H[i-1]||, keep each sample's top-k, and gather every per-token tensor
  (`TokenState`). Each layer writes only the tokens it processed into its own KV-cache layer,
  so layers of later stages have shorter caches. A family's per-token additions after its first
  layers (Qwen3-VL DeepStack) are one more gathered tensor.
* The host knows every prefill shape: one sync at the start reads each row's text and visual
  token counts (`RowCounts`), and each drop's kept counts follow from them by the same floor
  the device computes, so no drop waits for the GPU. The per-sample stats read the kept
  positions only when asked for (`DropRecord`), after the forward.
* Later forwards on that cache (decode, or a continuation chunk): one 2-D key mask per stage,
  grown by the new tokens, sized against that stage's own cache length, and turned into the
  attention mask without a host-device sync (`v2drop.key_masks`): one sync per stage made a
  V²Drop decode step slower than a stock one on GPU. Positions come from
  the caller and continue from the unpruned length.
* The cache reaches layers and mask builders under the installed transformers' keyword
  (`v2drop.compat.cache_kwarg`: `cache` from 5.24, `past_key_values` before), never both.
* Decoder layers get `position_ids=None`. Positions already live in the gathered cos/sin, and
  flash-attention reads the gapped positions of a pruned sequence as packed sequences
  (transformers' `_is_packed_sequence`), which would split one sample into several.

A "stage" is a run of layers between drops: stage 0 is layers [0, d1), stage 1 [d1, d2), ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from v2drop import key_masks
from v2drop.adapters.base import FamilyAdapter
from v2drop.compat import cache_kwarg
from v2drop.drop_record import DropRecord
from v2drop.schedule import Schedule
from v2drop.select import RowCounts, compact, keep_counts, select_visual, variation_scores
from v2drop.tokens import TokenState

# Arguments the stock forward's output-capturing decorators consume; layers must not get them.
_NOT_FOR_LAYERS = ("output_attentions", "output_hidden_states", "return_dict")


@dataclass
class StageMasks:
    """Per-stage 2-D key masks of a cache filled by a dropping prefill."""

    starts: list[int]  # first layer of each stage
    masks: list[torch.Tensor]  # [B, cached length of that stage] bool
    # True while no stage's mask holds padding (a host flag, so decode steps need not ask the
    # GPU per stage; see v2drop.key_masks). False is always safe: masks are then built.
    all_valid: bool = False

    def stage_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        ends = self.starts[1:] + [num_layers]
        return list(zip(self.starts, ends))


@dataclass
class PrefillResult:
    hidden: torch.Tensor  # [B, L', D] after the final norm
    stage_masks: StageMasks
    record: DropRecord


def layer_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _NOT_FOR_LAYERS}


def causal_mask(text_model, hidden: torch.Tensor, valid: torch.Tensor, cache, layer_idx: int, padded: bool = True):
    """The attention mask of `layer_idx` for queries `hidden`, keys = its cache + the queries.
    `padded` False (known on the host) passes no padding mask: transformers then asks the device
    nothing to find that out, and sdpa can run causal without a mask, as for an unpadded batch."""
    return create_causal_mask(
        config=text_model.config,
        inputs_embeds=hidden,
        attention_mask=valid if padded else None,
        layer_idx=layer_idx,
        **cache_kwarg(cache),
    )


def drop_stage_mask(text_model, state: TokenState, cache, layer_idx: int, padded: bool):
    """The prefill mask of the stage a drop starts. A padded one is built here without a sync
    (`v2drop.key_masks`) where its format is ours; transformers would ask the GPU whether the
    mask holds padding, which the host already knows."""
    if padded and key_masks.builds_masks_for(text_model.config._attn_implementation):
        return key_masks.additive_key_mask(state.valid, state.valid.shape[1], state.hidden.dtype)
    return causal_mask(text_model, state.hidden, state.valid, cache, layer_idx, padded)


def rotary(text_model, hidden: torch.Tensor, rope_positions: torch.Tensor):
    """cos/sin as [B, L, head_dim], expanded over the batch so they can be gathered per row."""
    cos, sin = text_model.rotary_emb(hidden, rope_positions)
    return cos.expand(hidden.shape[0], -1, -1), sin.expand(hidden.shape[0], -1, -1)


def check_cache(cache) -> None:
    if cache is None:
        return
    if not isinstance(cache, DynamicCache) or not all(type(l) is DynamicLayer for l in cache.layers):
        raise ValueError(
            "v2drop needs a DynamicCache of full-attention layers (per-layer lengths differ after "
            f"a drop); got {type(cache).__name__}. Use the default cache of generate()."
        )


# (hidden entering layer i, hidden entering layer i-1) -> [B, L] scores; larger is kept
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def drop_token_state(state: TokenState, counts: RowCounts, prev_hidden: torch.Tensor, keep: float,
                     score: ScoreFn = variation_scores) -> tuple[TokenState, RowCounts]:
    """One drop: score visual tokens, keep each sample's top-k, gather everything per token.
    No host-device sync: the device computes the same kept counts the host does."""
    kept = counts.after_drop(keep)
    scores = score(state.hidden, prev_hidden)
    kept_visual = select_visual(scores, state.visual, keep_counts(state.num_visual(), keep))
    keep_mask = (state.valid & ~state.visual) | kept_visual
    index, index_valid = compact(keep_mask, kept.longest())
    return state.gather(index, index_valid), kept


def add_after_layer(state: TokenState, layer_idx: int) -> None:
    """The family's per-token additions after layer `layer_idx` (Qwen3-VL DeepStack), if any."""
    if state.additions is None:
        return
    state.hidden = state.hidden + state.additions[:, :, layer_idx]
    if layer_idx == state.additions.shape[2] - 1:
        state.additions = None  # all made: later drops need not gather them


def prefill_with_drops(
    text_model,
    schedule: Schedule,
    state: TokenState,
    counts: RowCounts,
    cache,
    use_cache: bool,
    kwargs: dict,
    score: ScoreFn = variation_scores,
) -> PrefillResult:
    """Run all layers over a prefill, dropping visual tokens at the schedule's layers.
    `counts` are the state's (`RowCounts.of`); the loop asks the GPU nothing."""
    drops = dict(zip(schedule.layers, schedule.keep))
    layers = text_model.layers
    starts, masks, kept_positions, visual_counts = [0], [state.valid], [], []
    text_tokens = counts.text
    padded = [counts.padded(state.valid.shape[1])]  # per stage, known on the host
    mask = causal_mask(text_model, state.hidden, state.valid, cache, 0, padded[0])
    prev_hidden = None
    for i, layer in enumerate(layers):
        if i in drops:
            state, counts = drop_token_state(state, counts, prev_hidden, drops[i], score)
            padded.append(counts.padded(state.valid.shape[1]))
            mask = drop_stage_mask(text_model, state, cache, i, padded[-1])
            starts.append(i)
            masks.append(state.valid)
            kept_positions.append(state.source_index.masked_fill(~state.visual, -1))
        visual_counts.append(counts.visual)
        # H[i-1] is only needed when the next layer scores.
        prev_hidden = state.hidden if (i + 1) in drops else None
        state.hidden = layer(
            state.hidden,
            attention_mask=mask,
            position_embeddings=(state.cos, state.sin),
            position_ids=None,  # positions live in cos/sin; see the module docstring
            use_cache=use_cache,
            **cache_kwarg(cache),
            **kwargs,
        )
        add_after_layer(state, i)
    return PrefillResult(
        hidden=text_model.norm(state.hidden),
        stage_masks=StageMasks(starts=starts, masks=masks, all_valid=not any(padded)),
        record=DropRecord(visual_per_layer=visual_counts, text_tokens=text_tokens, kept_positions=kept_positions),
    )


def continue_on_dropped_cache(
    text_model,
    stage_masks: StageMasks,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    new_valid: torch.Tensor,
    cache,
    use_cache: bool,
    kwargs: dict,
) -> torch.Tensor:
    """Decode steps (or a text continuation) on a cache whose stages hold different lengths.

    At most one host-device sync per call, as the stock forward (see v2drop.key_masks)."""
    num_new = hidden.shape[1]
    attn = text_model.config._attn_implementation
    all_valid = still_all_valid(stage_masks, new_valid, attn)
    # A maskless multi-token chunk would make sdpa assume upper-left causality over a longer
    # cache, so only single-token steps go without masks.
    maskless = all_valid and num_new == 1
    for s, (start, end) in enumerate(stage_masks.stage_ranges(len(text_model.layers))):
        valid = torch.cat([stage_masks.masks[s], new_valid], dim=1)
        cached = cache.get_seq_length(start)
        if valid.shape[1] != cached + num_new:
            raise RuntimeError(
                f"v2drop: stage starting at layer {start} has a {cached}-token cache but a "
                f"{valid.shape[1] - num_new}-token key mask; the cache was changed outside generate()"
            )
        if maskless:
            mask = None
        elif key_masks.builds_masks_for(attn):
            mask = key_masks.additive_key_mask(valid, num_new, hidden.dtype)
        else:
            mask = causal_mask(text_model, hidden, valid, cache, start)
        for layer in text_model.layers[start:end]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=(cos, sin),
                position_ids=None,  # positions live in cos/sin; see the module docstring
                use_cache=use_cache,
                **cache_kwarg(cache),
                **kwargs,
            )
        if use_cache:
            stage_masks.masks[s] = valid
    if use_cache:
        stage_masks.all_valid = all_valid
    return text_model.norm(hidden)


def still_all_valid(stage_masks: StageMasks, new_valid: torch.Tensor, attn_implementation: str) -> bool:
    """True when, with the new tokens, no stage's mask holds padding (tracked for sdpa only: other
    kernels gain nothing from knowing).

    No question to the GPU for a one-token step on an unpadded cache: generate() keeps a 2-D mask
    only when the prompt is padded (then this flag is already False), so its decode tokens are
    real, and the stock forward asks nothing there either. A multi-token chunk is asked about once,
    as the stock forward asks once per call. A caller that marks a single decode token as padding
    on an unpadded cache must send it as part of a chunk."""
    if attn_implementation != "sdpa" or not stage_masks.all_valid:
        return False
    return new_valid.shape[1] == 1 or key_masks.all_real(new_valid)


def valid_tokens(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L] bool, False at padding, from a prefill's 2-D attention mask (None: no padding)."""
    if isinstance(attention_mask, dict):
        raise ValueError("v2drop needs a 2-D attention mask; masks prepared for compiled/static caches are not supported")
    if attention_mask is None:
        return torch.ones(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
    return attention_mask.to(device=inputs_embeds.device, dtype=torch.bool)


def initial_token_state(
    text_model,
    adapter: FamilyAdapter,
    inputs_embeds: torch.Tensor,
    valid: torch.Tensor,
    position_ids: torch.Tensor | None,
    visual: torch.Tensor,
    additions: torch.Tensor | None = None,
) -> TokenState:
    """valid: [B, L] bool from `valid_tokens`."""
    batch, length = inputs_embeds.shape[:2]
    rope_positions = adapter.positions(text_model, inputs_embeds, position_ids, None)
    cos, sin = rotary(text_model, inputs_embeds, rope_positions)
    return TokenState(
        hidden=inputs_embeds,
        cos=cos,
        sin=sin,
        valid=valid,
        visual=visual & valid,
        source_index=torch.arange(length, device=inputs_embeds.device).expand(batch, -1),
        additions=additions,
    )


def output(hidden: torch.Tensor, cache, use_cache: bool) -> BaseModelOutputWithPast:
    return BaseModelOutputWithPast(last_hidden_state=hidden, **cache_kwarg(cache if use_cache else None))
