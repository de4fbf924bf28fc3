"""Several prompts about one clip: the video is prefilled once, and its cache is shared.

For QA every clip gets several questions. The chat prompt puts the video before the question
(`workers.inputs.chat_text`), so all questions of a clip begin with the same tokens: system
prompt, user header, video. One generate call here:

1. prefills those shared prefixes, one row per clip: the vision encoder and the language model
   run once per clip, and V²Drop drops inside this prefill (its kept set cannot depend on a
   question that comes later);
2. forks the cache to one row per question (`v2drop.select_cache_rows`);
3. lets `generate` continue each row with its own question, from that cache.

The continuation batch has one row per question:

    [left pad][clip prefix][middle pad][question + assistant header]

The middle pads give every row the same prefix columns, so `generate` sees the prefix as cached.
They are masked out. transformers 5.23 counts position ids over real tokens only (attention-mask
cumsum, plus the rope deltas that Qwen stores per row), so each real token keeps the position it
has in an unshared prompt. The tests compare the logits with unshared generation.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import v2drop
from v2drop.compat import cache_kwarg, output_cache
from v2drop.flops import TextShape, continuation_flops
from workers.drop_stats import engine_stats, stats_marker, stock_stats, visual_token_ids
from workers.generation import GenResult, move_inputs, pad_token_id, results_for, timed_generate
from workers.inputs import Item, chat_text, decode_frames, video_metadata
from workers.settings import GenerationConfig

# Two prompts that share no first character: the chat texts agree exactly up to where the prompt goes.
_PROBES = ("\x01", "\x02")


@dataclass
class SharedCall:
    """What a shared-prefix call needs, worked out before any model work."""

    prefix: str  # chat text up to the prompt, the same for every clip
    clip_items: list[list[int]]  # item indices per clip, in first-seen order
    owner: list[int]  # clip of each item
    suffix_ids: list[list[int]]  # each item's tokens after its clip's prefix


def has_shared_clips(items: Sequence[Item]) -> bool:
    """True when some clip has more than one prompt in `items`."""
    return len({id(row) for row, _ in items}) < len(items)


def prompt_prefix(processor: Any, system: str | None) -> str:
    """The chat text before the prompt: what every prompt about one video shares."""
    first, second = (chat_text(processor, probe, system) for probe in _PROBES)
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    return first[:shared]


def plan(processor: Any, items: Sequence[Item], system: str | None, visual_ids: Sequence[int]) -> SharedCall | None:
    """Group `items` by clip and split their prompts; None when some prompt cannot be split
    cleanly: the video is not all in the shared part (a template that puts the question first),
    or tokens merge across the cut."""
    prefix = prompt_prefix(processor, system)
    tokenizer = processor.tokenizer
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if not set(prefix_ids) & set(visual_ids):
        return None
    clips: dict[int, int] = {}
    clip_items: list[list[int]] = []
    owner, suffix_ids = [], []
    for index, (row, prompt) in enumerate(items):
        text = chat_text(processor, prompt, system)
        if not text.startswith(prefix + prompt):
            return None
        suffix = text[len(prefix):]
        ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        if set(ids) & set(visual_ids) or tokenizer(text, add_special_tokens=False)["input_ids"] != prefix_ids + ids:
            return None
        clip = clips.setdefault(id(row), len(clips))
        if clip == len(clip_items):
            clip_items.append([])
        clip_items[clip].append(index)
        owner.append(clip)
        suffix_ids.append(ids)
    return SharedCall(prefix, clip_items, owner, suffix_ids)


def prefix_inputs(processor: Any, items: Sequence[Item], call: SharedCall) -> Any:
    """One left-padded row per clip: its prefix text and its video."""
    processor.tokenizer.padding_side = "left"
    rows = [items[indices[0]][0] for indices in call.clip_items]
    videos = [np.array(decode_frames(row)) for row in rows]  # writable copy for torch
    return processor(
        text=[call.prefix] * len(rows),
        videos=videos,
        video_metadata=[video_metadata(row, video) for row, video in zip(rows, videos)],
        do_sample_frames=False,
        padding=True,
        return_tensors="pt",
    )


def continuation_batch(
    prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, suffix_ids: Sequence[Sequence[int]], owner: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[prefix of the owner clip][middle pad][suffix] per row, and its attention mask.

    Example: prefix rows [[0, 5, 6]] (mask [[0, 1, 1]]), suffixes [[7], [8, 9]], owner [0, 0], pad 0 ->
    ids [[0, 5, 6, 0, 7], [0, 5, 6, 8, 9]], mask [[0, 1, 1, 0, 1], [0, 1, 1, 1, 1]].
    """
    width = max(len(ids) for ids in suffix_ids)
    rows, masks = [], []
    for ids, clip in zip(suffix_ids, owner):
        gap = width - len(ids)
        suffix = torch.tensor([pad_id] * gap + list(ids), dtype=prefix_ids.dtype, device=prefix_ids.device)
        suffix_mask = torch.tensor([0] * gap + [1] * len(ids), dtype=prefix_mask.dtype, device=prefix_mask.device)
        rows.append(torch.cat([prefix_ids[clip], suffix]))
        masks.append(torch.cat([prefix_mask[clip], suffix_mask]))
    return torch.stack(rows), torch.stack(masks)


def fork_prefix_cache(model: Any, cache: Any, owner: Sequence[int], rope_deltas: torch.Tensor | None) -> None:
    """One cache row per item, and Qwen's per-row rope deltas with them."""
    index = torch.tensor(owner, device=cache.layers[0].keys.device)
    v2drop.select_cache_rows(model, cache, index)
    if rope_deltas is not None:
        model.model.rope_deltas = rope_deltas[index.to(rope_deltas.device)]


def continuation_rope_deltas(model: Any, prefix: Mapping[str, Any]) -> torch.Tensor | None:
    """Qwen families (3-D M-RoPE): per clip, what turns a text position counted over real tokens
    into its M-RoPE position after the prefix. None for 1-D RoPE families.

    The deltas Qwen stores after a prefill place the next token at max(positions) + 1. After a
    video whose temporal positions run past its spatial ones (2 fps, tokens_per_second 2) that
    max is a video position, not the last token's: the next token must follow the last token.
    """
    inner = getattr(model, "model", None)
    if not hasattr(inner, "get_rope_index"):
        return None
    wanted = inspect.signature(inner.get_rope_index).parameters
    positions, _ = inner.get_rope_index(**{k: v for k, v in prefix.items() if k in wanted})
    last = positions[:, :, -1]  # [3, clips]: left padding puts each prefix's last token in the last column
    if not bool((last == last[0]).all()):
        raise ValueError("shared prefix: the prefix must end in a text token (t, h, w positions agree)")
    return (last[0] + 1 - prefix["attention_mask"].sum(dim=1).to(last.device)).unsqueeze(1)


def generate_shared(
    model: Any, processor: Any, items: Sequence[Item], system: str | None, generation_cfg: GenerationConfig
) -> list[GenResult] | None:
    """Results for `items`, in order, with one video prefill per clip; None if the prompts
    cannot be split (the caller then runs them unshared)."""
    call = plan(processor, items, system, visual_token_ids(model))
    if call is None:
        return None
    prefix = move_inputs(prefix_inputs(processor, items, call), model)
    clip_stats: list[dict] = []

    def make_inputs() -> dict[str, Any]:
        inputs, stats = prefill_and_fork(model, processor, call, prefix)
        clip_stats.extend(stats)
        return inputs

    inputs, sequences, prefill_ms, generate_ms, peak_bytes, fallback = timed_generate(
        model, processor, make_inputs, generation_cfg)
    return results_for(processor, model, inputs, sequences, item_stats(model, call, clip_stats), prefill_ms=prefill_ms,
                       generate_ms=generate_ms, peak_memory_bytes=peak_bytes, fallback_reason=fallback)


def prefill_and_fork(model: Any, processor: Any, call: SharedCall, prefix: Mapping[str, Any]) -> tuple[dict, list[dict]]:
    """Prefill the clips' prefixes, fork the cache per item; returns the `generate` inputs that
    continue from it, and per-clip stats of the prefill."""
    marker = stats_marker(model)
    out = model(**prefix, use_cache=True, logits_to_keep=1)
    stats = prefix_stats(model, prefix, marker)
    cache = output_cache(out)
    fork_prefix_cache(model, cache, call.owner, continuation_rope_deltas(model, prefix))
    ids, mask = continuation_batch(prefix["input_ids"], prefix["attention_mask"], call.suffix_ids, call.owner,
                                   pad_token_id(model, processor))
    return {"input_ids": ids, "attention_mask": mask, **cache_kwarg(cache)}, stats


def prefix_stats(model: Any, prefix: Mapping[str, Any], marker: object | None) -> list[dict]:
    """Per clip: the drop_stats columns of its prefix prefill, plus the tokens each layer cached."""
    if v2drop.is_enabled(model) and (stats := v2drop.last_stats(model)) is not marker:
        return [{**engine_stats(s), "cached_per_layer": [s["num_text_tokens"] + n for n in s["visual_tokens_per_layer"]]}
                for s in stats]
    num_layers = model.config.get_text_config().num_hidden_layers
    valid = prefix["attention_mask"].sum(dim=1).tolist()
    return [{**s, "cached_per_layer": [int(n)] * num_layers}
            for s, n in zip(stock_stats(model, prefix["input_ids"], prefix["attention_mask"]), valid)]


def item_stats(model: Any, call: SharedCall, clip_stats: list[dict]) -> list[dict]:
    """Per item: its clip's counts; FLOPs = an equal share of the clip's prefill plus its own
    question over the clip's cache (full: the unpruned cache; dropped: the pruned one)."""
    shape = TextShape.from_config(model.config.get_text_config())
    unpruned = [[s["cached_per_layer"][0]] * shape.num_layers for s in clip_stats]  # layer 0 caches the whole prefix
    stats = []
    for clip, suffix in zip(call.owner, call.suffix_ids):
        s, share = clip_stats[clip], len(call.clip_items[clip])
        stats.append({
            "retention_achieved": s["retention_achieved"],
            "visual_tokens_per_stage": s["visual_tokens_per_stage"],
            "flops_full": s["flops_full"] / share + continuation_flops(shape, len(suffix), unpruned[clip]),
            "flops_dropped": s["flops_dropped"] / share + continuation_flops(shape, len(suffix), s["cached_per_layer"]),
        })
    return stats
