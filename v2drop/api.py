"""enable / disable / last_stats: patch a loaded Hugging Face VLM in place.

`enable` replaces the forward of the model's text decoder (an instance attribute, so the class
and other instances are untouched) and adds a pre-hook on the multimodal model that records the
token ids of each call: the text decoder only receives embeddings, and visual spans are found
from the ids, never from hard-coded offsets.
"""

from __future__ import annotations

import logging
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

from v2drop import compat, loop, prefill_graphs
from v2drop.adapters import adapter_for
from v2drop.adapters.base import FamilyAdapter
from v2drop.drop_record import DropRecord, per_sample_stats
from v2drop.flops import TextShape
from v2drop.prefill_graphs import PrefillGraphs
from v2drop.schedule import Schedule
from v2drop.select import RowCounts, random_scores, variation_scores

logger = logging.getLogger("v2drop")

_STATE_ATTR = "_v2drop_state"


@dataclass
class DropState:
    """Everything v2drop keeps on a patched model (no module-level mutable state)."""

    schedule: Schedule
    adapter: FamilyAdapter
    visual_ids: torch.Tensor
    shape: TextShape
    hook: Any  # the pre-hook handle on the multimodal model
    score: loop.ScoreFn = variation_scores
    pending_input_ids: torch.Tensor | None = None
    # The cache filled by the last dropping prefill, and its per-stage key masks.
    cache_ref: Any = None
    stage_masks: loop.StageMasks | None = None
    last_stats: list[dict] = field(default_factory=list)
    # The last dropping prefill's record, turned into last_stats when they are first asked for.
    last_record: DropRecord | None = None
    prefill_graphs: PrefillGraphs | None = None  # small prefills replayed as CUDA graphs, if given

    def owns(self, cache) -> bool:
        return cache is not None and self.cache_ref is not None and self.cache_ref() is cache


SCORERS = ("variation", "random")


def enable(model: nn.Module, schedule: Schedule, *, scorer: str = "variation", seed: int = 0,
           allow_untested: bool = False, prefill_graphs: PrefillGraphs | None = None) -> nn.Module:
    """Patch `model` to drop visual tokens per `schedule`; returns the model. Idempotent:
    enabling again replaces the schedule, scorer and prefill graphs.

    prefill_graphs: `v2drop.PrefillGraphs()` replays small unpadded prefills (by default up to
    8,192 token slots: batch 1-3 of a 2,048-visual-token clip) as CUDA graphs, one recording per
    shape, checked bit for bit against an eager run; with an empty Schedule(layers=(), keep=()) it
    does so for the stock model's own forward.

    scorer "variation" is V²Drop; "random" keeps a seeded random subset at the same schedule,
    the control baseline for benchmarks.

    A transformers version outside `v2drop.compat.TESTED_TRANSFORMERS` is refused with a
    ValueError unless `allow_untested` (or V2DROP_ALLOW_UNTESTED_TRANSFORMERS=1). Either way, the
    first enable() of a family in a process runs `v2drop.self_check` (about a second on CPU) and
    raises `SelfCheckError` if the patched forward is not the stock model at keep 1.0 or not the
    slow reference with drops.
    """
    compat.check_transformers(allow_untested)
    adapter_for(model)  # refuse an unsupported family before building anything for the check
    from v2drop.runtime_check import self_check  # the check patches tiny models through patch()

    self_check(model)
    return patch(model, schedule, scorer=scorer, seed=seed, prefill_graphs=prefill_graphs)


def patch(model: nn.Module, schedule: Schedule, *, scorer: str = "variation", seed: int = 0,
          prefill_graphs: PrefillGraphs | None = None) -> nn.Module:
    """enable() without the version check and the self-check: what the self-check itself runs."""
    adapter = adapter_for(model)
    text_model = adapter.text_model(model)
    _check_text_model(text_model, adapter)
    schedule.check_depth(text_model.config.num_hidden_layers)
    score = _scorer(scorer, seed, model)
    if (state := getattr(model, _STATE_ATTR, None)) is not None:
        state.schedule, state.score, state.prefill_graphs = schedule, score, prefill_graphs
        return model
    state = DropState(
        schedule=schedule,
        adapter=adapter,
        visual_ids=torch.tensor(adapter.visual_token_ids(model)),
        shape=TextShape.from_config(text_model.config),
        hook=adapter.multimodal_model(model).register_forward_pre_hook(
            _record_input_ids(model), with_kwargs=True
        ),
        score=score,
        prefill_graphs=prefill_graphs,
    )
    setattr(model, _STATE_ATTR, state)
    text_model.forward = types.MethodType(_patched_text_forward(model), text_model)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Restore the stock model. Harmless on a model that was never enabled."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    state.hook.remove()
    text_model = state.adapter.text_model(model)
    del text_model.forward  # the class's forward shows through again
    delattr(model, _STATE_ATTR)
    return model


def is_enabled(model: nn.Module) -> bool:
    return getattr(model, _STATE_ATTR, None) is not None


def schedule_of(model: nn.Module) -> Schedule | None:
    """The schedule this model drops with, or None when v2drop is off (the stock model)."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state.schedule


def select_cache_rows(model: nn.Module, cache, index: torch.Tensor) -> None:
    """Keep, in place, the rows `index` of a cache this model filled (repeats allowed): e.g. one
    row per question from a prefill of one row per video. On a cache filled by a dropping
    prefill, the per-stage key masks follow the rows, so generation can go on from it."""
    cache.batch_select_indices(index)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None and state.owns(cache) and state.stage_masks is not None:
        masks = state.stage_masks.masks
        state.stage_masks.masks = [mask[index.to(mask.device)] for mask in masks]


def last_stats(model: nn.Module) -> list[dict]:
    """Per-sample stats of the last forward that held visual tokens ([] if none yet)."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("v2drop is not enabled on this model; call v2drop.enable(model, schedule) first")
    if state.last_record is not None:
        state.last_stats = per_sample_stats(state.last_record, state.schedule, state.shape)
        state.last_record = None
    return state.last_stats


# -- internals ---------------------------------------------------------------------------


def _scorer(name: str, seed: int, model: nn.Module) -> loop.ScoreFn:
    if name == "variation":
        return variation_scores
    if name == "random":
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        return lambda hidden_now, hidden_prev: random_scores(hidden_now, generator)
    raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")


def _check_text_model(text_model: nn.Module, adapter: FamilyAdapter) -> None:
    for attribute in ("layers", "rotary_emb", "norm", "embed_tokens"):
        if not hasattr(text_model, attribute):
            raise ValueError(
                f"{type(text_model).__name__} has no `{attribute}`: this transformers "
                f"{transformers.__version__} does not match the {adapter.name} adapter "
                f"(tested with {', '.join(compat.TESTED_TRANSFORMERS)})"
            )
    layer_types = set(getattr(text_model.config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"v2drop supports full-attention decoders only; layer types: {sorted(layer_types)}")


def _record_input_ids(model: nn.Module):
    model_ref = weakref.ref(model)

    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        getattr(model_ref(), _STATE_ATTR).pending_input_ids = input_ids

    return hook


def _patched_text_forward(model: nn.Module):
    model_ref = weakref.ref(model)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        state: DropState = getattr(model_ref(), _STATE_ATTR)
        token_ids = state.pending_input_ids if input_ids is None else input_ids
        state.pending_input_ids = None
        cache = compat.pop_cache(kwargs)  # whichever name the caller used (see v2drop.compat)
        stock = type(self).forward.__get__(self)
        call = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                    **compat.cache_kwarg(cache), **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past_length = cache.get_seq_length() if cache is not None else 0

        if past_length == 0:
            visual = _visual_mask(state, token_ids, inputs_embeds)
            if visual is not None and state.schedule.layers:
                loop.check_cache(cache)  # before the mask: a static cache also brings a prepared one
                valid = loop.valid_tokens(inputs_embeds, attention_mask)
                counts = RowCounts.of(valid, visual)
                if any(counts.visual):
                    return _dropping_prefill(self, state, inputs_embeds, visual, valid, counts,
                                             position_ids, cache, use_cache, kwargs)
            state.cache_ref, state.stage_masks = None, None
            if state.prefill_graphs is not None:
                return prefill_graphs.stock_prefill(state.prefill_graphs, self, stock, inputs_embeds, attention_mask,
                                                    call)
            return stock(inputs_embeds=inputs_embeds, **call)
        if state.owns(cache):
            return _continuation(self, state, inputs_embeds, attention_mask, position_ids,
                                 cache, use_cache, kwargs)
        return stock(inputs_embeds=inputs_embeds, **call)

    return forward


def _visual_mask(state: DropState, token_ids, inputs_embeds) -> torch.Tensor | None:
    if token_ids is None or tuple(token_ids.shape) != tuple(inputs_embeds.shape[:2]):
        logger.warning("v2drop: no token ids matching this forward's embeddings; visual tokens NOT dropped")
        return None
    return torch.isin(token_ids, state.visual_ids.to(token_ids.device)).to(inputs_embeds.device)


def _dropping_prefill(text_model, state, inputs_embeds, visual, valid, counts, position_ids,
                      cache, use_cache, kwargs):
    if use_cache and cache is None:
        cache = loop.DynamicCache(config=text_model.config)
    tokens = loop.initial_token_state(text_model, state.adapter, inputs_embeds, valid, position_ids,
                                      visual, state.adapter.layer_additions(kwargs, inputs_embeds))
    layer_kwargs = loop.layer_kwargs(kwargs)

    def run(tokens, cache):
        return loop.prefill_with_drops(text_model, state.schedule, tokens, counts, cache, use_cache, layer_kwargs,
                                       state.score)

    if state.prefill_graphs is not None:
        result = prefill_graphs.dropping_prefill(state.prefill_graphs, text_model, run, tokens, counts, cache,
                                                 (state.schedule, state.score, use_cache, layer_kwargs))
    else:
        result = run(tokens, cache)
    state.last_record = result.record
    logger.debug("v2drop visual tokens per layer: %s", result.record.visual_per_layer)
    state.cache_ref = weakref.ref(cache) if use_cache else None
    state.stage_masks = result.stage_masks if use_cache else None
    return loop.output(result.hidden, cache, use_cache)


def _continuation(text_model, state, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs):
    if state.adapter.layer_additions(kwargs, inputs_embeds) is not None:
        raise ValueError("v2drop: visual inputs after a dropping prefill are not supported; start a new generate()")
    num_new = inputs_embeds.shape[1]
    if attention_mask is None or isinstance(attention_mask, dict):
        new_valid = torch.ones(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
    else:
        new_valid = attention_mask[:, -num_new:].to(device=inputs_embeds.device, dtype=torch.bool)
    rope_positions = state.adapter.positions(text_model, inputs_embeds, position_ids, cache)
    cos, sin = loop.rotary(text_model, inputs_embeds, rope_positions)
    hidden = loop.continue_on_dropped_cache(
        text_model, state.stage_masks, inputs_embeds, cos, sin, new_valid, cache,
        use_cache, loop.layer_kwargs(kwargs),
    )
    return loop.output(hidden, cache, use_cache)
