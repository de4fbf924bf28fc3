"""`bench_model --batch-sizes auto`: each variant at the batch the model stage would choose.

The model stage sizes its calls with `workers.call_size` over the one memory model
(`v2drop.memory`): a budget of `actors.memory_fraction` of the GPU memory free after loading (or
a fixed `actors.memory_budget_gib`), divided by one clip's bytes for its token counts, the dtype,
the cache for `generation.max_new_tokens` and the V²Drop schedule. A dropped cache is smaller, so
V²Drop gets larger calls from the same budget (Qwen2.5-VL-7B shapes, bf16, this benchmark's clip of
2,048 visual and 49 text tokens, 256 new tokens, 108 GiB: 250 clips stock, 308 V²Drop). Here the
same code computes both numbers; nothing in this module restates the memory model or its defaults.
"""

from __future__ import annotations

import argparse

import torch

from bench.model_setup import VARIANTS, clip_batch
from workers.call_size import call_sizer, memory_budget_bytes
from workers.settings import ActorsConfig

AUTO = "auto"
FIXED, ENGINE = "fixed", "engine"  # a row's batch_chosen_by
# The most clips an auto batch may hold. It stands in for `actors.batch_size`, the most one model
# call receives, which a deployment raises so that the memory budget decides (its default, 64,
# would make auto the fixed 64 rows). 512 does not bind at 7B shapes on an H200 (~257 / ~317), so the
# auto rows there are the memory model's choice; it does bound a model tiny beside its budget (a
# toy model under a large forced budget would otherwise ask for thousands of clips, and the run's
# time grows with the batch).
MAX_AUTO_BATCH = 512


def batch_size_arg(text: str) -> int | str:
    """argparse type of --batch-sizes: a positive integer, or 'auto'."""
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or '{AUTO}', got {text!r}")
    return value


def budget_bytes(device: str, budget_gib: float | None) -> int | None:
    """The model stage's budget: `budget_gib` when given, else (CUDA) the actors.memory_fraction
    default of the memory free now. Call it right after the model is built, as the stage does after
    loading. The allocator's cached blocks are released first: mem_get_info counts them as used,
    and a random build leaves init temporaries that a stage's load would not."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return memory_budget_bytes(torch.device(device), ActorsConfig.memory_fraction, budget_gib)


def engine_batches(model, tokenizer, args, schedule, budget: int) -> dict:
    """Clips per model call for each variant, as `workers.call_size` sizes them for this clip and
    the longest --new-tokens (the stage sizes its cache for generation.max_new_tokens), at most
    --max-auto-batch; with the figures it came from, for the report."""
    clip = clip_batch(model, tokenizer, args.grid, 1, args.device)
    prompt = clip["input_ids"].shape[1]
    visual = int((clip["mm_token_type_ids"] != 0).sum())  # before the first drop, as the stage learns it
    out: dict = {"budget_bytes": budget, "budget_gib_forced": args.memory_budget_gib,
                 "memory_fraction": ActorsConfig.memory_fraction, "max_auto_batch": args.max_auto_batch,
                 "new_tokens": max(args.new_tokens), "prompt_tokens": prompt, "visual_tokens": visual,
                 "clip_bytes": {}, "batch": {}}
    for variant in VARIANTS:
        sizer = call_sizer(model, schedule if variant == "v2drop" else None, "static", out["new_tokens"], budget)
        sizer.learn([(prompt, visual)])
        out["clip_bytes"][variant] = sizer.row_bytes
        out["batch"][variant] = sizer.rows_per_call(args.max_auto_batch)
    return out


def batch_groups(size: int | str, auto: dict | None) -> list[tuple[int, tuple[str, ...], str]]:
    """(batch, variants, batch_chosen_by) to measure for one --batch-sizes entry: a fixed size runs
    every variant at it; auto runs each variant at its own batch (variants with equal batches
    together, so they share one vision-tower pass as fixed sizes do)."""
    if size != AUTO:
        assert isinstance(size, int)
        return [(size, VARIANTS, FIXED)]
    assert auto is not None, "engine_batches runs before any auto entry"
    return [(b, tuple(v for v in VARIANTS if auto["batch"][v] == b), ENGINE) for b in sorted(set(auto["batch"].values()))]

