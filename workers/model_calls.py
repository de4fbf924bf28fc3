"""Items (clip, prompt) into generate calls: how they are cut, whether a clip's video is prefilled
once for all its prompts, and how a failed call is retried.

    run_items(loaded, items, system, generation_cfg, chunk) -> one GenResult per item, in order

`plan_call` is the one place that decides shared vs per-question generation for a call; a
configured share that cannot be used is logged with its reason (the call then runs unshared).
"""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vlm.families import needs_equal_frame_count, visual_token_ids
from workers import shared_prefix
from workers.device_inputs import timed_inputs
from workers.generation import generate_batch
from workers.model_inputs import Item, build_inputs, decode_frames
from workers.rows import GenResult
from workers.settings import GenerationConfig

if TYPE_CHECKING:  # the stage module imports this one
    from workers.model_stage import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallPlan:
    """How one generate call runs: `shared` splits its prompts after a per-clip video prefix;
    None runs every item with its own copy of the video."""

    shared: shared_prefix.SharedCall | None
    fallback: str | None = None  # why a configured share is not used; None when shared or not asked


def plan_call(loaded: LoadedModel, items: Sequence[Item], system: str | None, share: bool) -> CallPlan:
    """Shared when `generation.share_video_prefix` asks for it, some clip has several prompts in
    this call and every prompt splits cleanly after the video; otherwise unshared, and a share
    that was asked for and possible in principle but failed to split is logged."""
    if not share or not shared_prefix.has_shared_clips(items):
        return CallPlan(None)
    call = shared_prefix.plan(loaded.processor, items, system, visual_token_ids(loaded.model.config))
    if isinstance(call, str):
        log.warning("generation.share_video_prefix: each prompt of this call prefills its own video (%s)", call)
        return CallPlan(None, fallback=call)
    return CallPlan(call)


def generate_items(
    loaded: LoadedModel, items: Sequence[Item], system: str | None, generation_cfg: GenerationConfig
) -> list[GenResult]:
    """One generate call, shared or not as `plan_call` decides; every result gets the call's id."""
    plan = plan_call(loaded, items, system, generation_cfg.share_video_prefix)
    model, processor, device = loaded.model, loaded.processor, loaded.inputs_device
    if plan.shared is not None:
        results = shared_prefix.generate_shared(model, processor, items, plan.shared, generation_cfg, device)
    else:
        inputs, inputs_ms = timed_inputs(model, lambda: build_inputs(processor, items, system, device))
        results = generate_batch(model, processor, inputs, generation_cfg, inputs_ms)
    batch_id = new_batch_id()  # inputs_ms, prefill_ms, generate_ms and peak_memory_bytes are this call's
    for result, several in zip(results, shared_prefix.in_shared_clip(items)):  # a clip's one prompt shares nothing
        result.batch_id = batch_id
        if result.fallback_reason is not None and result.fallback_batch_id is None:
            result.fallback_batch_id = batch_id  # the static engine failed inside this call (decoded again)
        result.video_prefill_shared = plan.shared is not None and several
        result.video_prefill_unshared_reason = plan.fallback if several else None
    return results


def run_items(
    loaded: LoadedModel, items: Sequence[Item], system: str | None, generation_cfg: GenerationConfig, chunk: int
) -> list[GenResult]:
    """Results for `items` in order, at most `chunk` clips per generate call.

    With `generation.share_video_prefix` (the default), each call holds whole clips and all their
    prompts, so that `plan_call` can prefill a clip's video once for all of them
    (workers.shared_prefix). Without it, a call holds at most `chunk` items, each with its own
    copy of the video.

    Families whose processor stacks each video's frames into one tensor (LLaVA-OneVision) can
    only batch clips with equal frame counts, so their items are grouped by frame count first.
    Example (unshared, one prompt per clip): frame counts [16, 16, 8, 16], chunk 2 -> calls
    [0, 1], [3], [2].
    """
    results: list[GenResult | None] = [None] * len(items)
    share = generation_cfg.share_video_prefix

    def rows() -> int:  # asked before each call, after the previous call's learn
        return loaded.sizer.rows_per_call(len(items)) if loaded.sizer else len(items)

    for indices in batch_groups(loaded.model, items):
        for part in planned_calls(items, indices, chunk, share, rows):
            outcomes = generate_with_fallback(loaded, [items[i] for i in part], system, generation_cfg)
            for i, outcome in zip(part, outcomes):
                results[i] = outcome
            if loaded.sizer:
                loaded.sizer.learn([(r.prompt_tokens, r.visual_tokens_per_stage[0]) for r in outcomes
                                    if r.status == "ok" and r.visual_tokens_per_stage])
    return results  # type: ignore[return-value] - every index was filled


def planned_calls(items: Sequence[Item], indices: list[int], chunk: int, share: bool,
                  rows: Callable[[], int]) -> Iterator[list[int]]:
    """`indices` cut into generate calls, lazily: `rows()` (the memory budget in items) is asked
    before each call, so it can learn from the one before. Without a budget each call holds
    `chunk` whole clips when sharing the video prefill, else `chunk` items. Example: clips
    [a, a, b, c, c], chunk 2, share -> [0, 1, 2], [3, 4]."""
    remaining = list(indices)
    while remaining:
        part = next_call(items, remaining, chunk, rows(), share)
        taken = set(part)
        remaining = [i for i in remaining if i not in taken]
        yield part


def next_call(items: Sequence[Item], remaining: list[int], chunk: int, rows: int, share: bool) -> list[int]:
    """The next generate call from `remaining`: at most `rows` items (the memory budget) and, when
    sharing the video prefill, whole clips, at most `chunk` of them; always at least one clip."""
    if not share:
        return remaining[:max(1, min(chunk, rows))]
    clips: dict[int, list[int]] = {}
    for index in remaining:
        clips.setdefault(id(items[index][0]), []).append(index)
    call: list[int] = []
    for number, clip in enumerate(clips.values()):
        if number == chunk or (call and len(call) + len(clip) > rows):
            break
        call += clip
    return call


def batch_groups(model: Any, items: Sequence[Item]) -> list[list[int]]:
    """Item indices grouped into what may share one generate call, in first-seen order."""
    if not needs_equal_frame_count(model.config):  # one [B, T, C, H, W] video tensor needs one T
        return [list(range(len(items)))]
    groups: dict[int, list[int]] = {}
    for index, (row, _) in enumerate(items):
        groups.setdefault(decode_frames(row).shape[0], []).append(index)
    return list(groups.values())


def generate_with_fallback(
    loaded: LoadedModel, items: Sequence[Item], system: str | None, generation_cfg: GenerationConfig
) -> list[GenResult]:
    """Batched generate; on OOM split in halves, on any other error retry each clip alone (each
    item alone within one clip). A call that shares its video prefill is split between clips, so
    one bad clip does not cost the others their shared prefill. The retries run after the except
    clause: inside it the error's traceback keeps the failed call's frames, and with them its
    inputs and KV cache, on the device."""
    try:
        return generate_items(loaded, items, system, generation_cfg)
    except Exception as error:  # noqa: BLE001 - one bad clip must not fail the batch
        failed, kind, out_of_memory = GenResult.failed(error), type(error).__name__, isinstance(error, torch.OutOfMemoryError)
    release_failed_call()
    if len(items) == 1:
        log.warning("item failed: %s", failed.error)
        return [failed]
    parts, unit = retry_parts(items, generation_cfg.share_video_prefix)
    if out_of_memory:
        half = sum(len(part) for part in parts[:len(parts) // 2])  # between clips when sharing
        log.warning("CUDA out of memory with %d items; retrying as %d + %d", len(items), half, len(items) - half)
        return retried("OutOfMemoryError: batch halved",
                       [*generate_with_fallback(loaded, items[:half], system, generation_cfg),
                        *generate_with_fallback(loaded, items[half:], system, generation_cfg)])
    log.warning("batch of %d failed (%s); retrying each %s alone", len(items), failed.error, unit)
    return retried(f"{kind}: retried {unit} by {unit}",
                   [r for part in parts for r in generate_with_fallback(loaded, part, system, generation_cfg)])


def retry_parts(items: Sequence[Item], share: bool) -> tuple[list[list[Item]], str]:
    """What a failed call is retried as, and the name of one part: each clip's consecutive prompts
    together when sharing the video prefill and the call holds several clips, some with several
    prompts ('clip'); else each item alone ('item')."""
    runs: list[list[Item]] = []
    for item in items:
        if runs and runs[-1][0][0] is item[0]:
            runs[-1].append(item)
        else:
            runs.append([item])
    if share and 1 < len(runs) < len(items):
        return runs, "clip"
    return [[item] for item in items], "item"


def retried(reason: str, results: list[GenResult]) -> list[GenResult]:
    """Mark results made by retrying a failed call; an inner retry's reason is kept (the first
    cause), the outer failed call is named so the summary counts each failed call once."""
    failed_call = new_batch_id()
    for result in results:
        if result.fallback_reason is None:
            result.fallback_reason, result.fallback_batch_id = reason, failed_call
    return results


def new_batch_id() -> str:
    return uuid.uuid4().hex[:16]


def release_failed_call() -> None:
    """Free what a failed call left: its frames, once its error is gone, unless they sit in a
    reference cycle (hence the collection), and the allocator's cached blocks (fragmentation)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
