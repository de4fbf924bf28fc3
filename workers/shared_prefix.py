"""Several prompts about one clip: the video is prefilled once, and its cache is shared.

For QA every clip gets several questions. The chat prompt puts the video before the question
(`workers.model_inputs.chat_text`), so all questions of a clip begin with the same tokens: system
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
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import v2drop
from v2drop.adapters import adapter_for
from v2drop.compat import cache_kwarg, output_cache
from v2drop.kernels import fewer_kernels
from workers.device_inputs import timed_inputs
from workers.generation import pad_token_id, results_for, timed_generate
from workers.model_inputs import Item, chat_text, process
from workers.rows import GenResult
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


def in_shared_clip(items: Sequence[Item]) -> list[bool]:
    """Per item: whether its clip has more than one prompt in `items` (something to share)."""
    prompts = Counter(id(row) for row, _ in items)
    return [prompts[id(row)] > 1 for row, _ in items]


def prompt_prefix(processor: Any, system: str | None) -> str:
    """The chat text before the prompt: what every prompt about one video shares."""
    first, second = (chat_text(processor, probe, system) for probe in _PROBES)
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    return first[:shared]


def plan(processor: Any, items: Sequence[Item], system: str | None, visual_ids: Sequence[int]) -> SharedCall | str:
    """Group `items` by clip and split their prompts, or say why some prompt cannot be split
    cleanly: the video is not all in the shared part (a template that puts the question first),
    or tokens merge across the cut. workers.model_calls.plan_call logs the reason."""
    prefix = prompt_prefix(processor, system)
    tokenizer = processor.tokenizer
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if not set(prefix_ids) & set(visual_ids):
        return "the chat template puts no video before the prompt"
    clips: dict[int, int] = {}
    clip_items: list[list[int]] = []
    owner, suffix_ids = [], []
    for index, (row, prompt) in enumerate(items):
        text = chat_text(processor, prompt, system)
        if not text.startswith(prefix + prompt):
            return f"the chat text of prompt {prompt!r} does not begin with the shared prefix"
        suffix = text[len(prefix):]
        ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
        if set(ids) & set(visual_ids):
            return f"prompt {prompt!r} is followed by visual tokens"
        if tokenizer(text, add_special_tokens=False)["input_ids"] != prefix_ids + ids:
            return f"the tokens of prompt {prompt!r} merge with the prefix's across the cut"
        clip = clips.setdefault(id(row), len(clips))
        if clip == len(clip_items):
            clip_items.append([])
        clip_items[clip].append(index)
        owner.append(clip)
        suffix_ids.append(ids)
    return SharedCall(prefix, clip_items, owner, suffix_ids)


def prefix_inputs(processor: Any, items: Sequence[Item], call: SharedCall, device: torch.device | None = None) -> Any:
    """One left-padded row per clip: its prefix text and its video (`device`: model_inputs.process)."""
    rows = [items[indices[0]][0] for indices in call.clip_items]
    return process(processor, [call.prefix] * len(rows), rows, device)


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
    model: Any, processor: Any, items: Sequence[Item], call: SharedCall, generation_cfg: GenerationConfig,
    device: torch.device | None = None,
) -> list[GenResult]:
    """Results for `items`, in order, with one video prefill per clip (`call`: how they split;
    `device`: where the video processor works, workers.device_inputs)."""
    prefix, inputs_ms = timed_inputs(model, lambda: prefix_inputs(processor, items, call, device))
    clip_stats: list[v2drop.VisualStats] = []

    def make_inputs(engine: str) -> dict[str, Any]:
        inputs, stats = prefill_and_fork(model, processor, call, prefix, fused=engine == "static")
        clip_stats[:] = stats  # the prefill's (made again when a failed static attempt consumed its cache)
        return inputs

    inputs, sequences, prefill_ms, generate_ms, peak_bytes, fallback = timed_generate(
        model, processor, make_inputs, generation_cfg)
    item_stats = [v2drop.continued(model, clip_stats[clip], len(suffix), len(call.clip_items[clip]))
                  for clip, suffix in zip(call.owner, call.suffix_ids)]
    return results_for(processor, model, inputs, sequences, item_stats, inputs_ms=inputs_ms, prefill_ms=prefill_ms,
                       generate_ms=generate_ms, peak_memory_bytes=peak_bytes, fallback_reason=fallback)


def prefill_and_fork(model: Any, processor: Any, call: SharedCall, prefix: Mapping[str, Any],
                     fused: bool = False) -> tuple[dict, list[v2drop.VisualStats]]:
    """Prefill the clips' prefixes, fork the cache per item; returns the `generate` inputs that
    continue from it, and per-clip stats of the prefill. fused: the text model's norms, rotary and
    projections in fewer kernels (v2drop.kernels.fewer_kernels), as the static engine, which
    continues from this cache, runs its own prefill: the same kernels as for an unshared prompt."""
    marker = v2drop.stats_marker(model)
    with fewer_kernels(adapter_for(model).text_model(model), fused):
        out = model(**prefix, use_cache=True, logits_to_keep=1)
    stats = v2drop.prefill_stats(model, prefix["input_ids"], prefix["attention_mask"], marker)
    cache = output_cache(out)
    fork_prefix_cache(model, cache, call.owner, continuation_rope_deltas(model, prefix))
    ids, mask = continuation_batch(prefix["input_ids"], prefix["attention_mask"], call.suffix_ids, call.owner,
                                   pad_token_id(model, processor))
    return {"input_ids": ids, "attention_mask": mask, **cache_kwarg(cache)}, stats
