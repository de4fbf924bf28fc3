"""Whole-model cost per clip: vision tower, LLM prefill, decode; stock vs V²Drop side by side.

    python -m bench.bench_model --seven-b --device cuda --dtype bfloat16     # one GPU, < 8 min
    python -m bench.bench_model --batch-sizes 1 4 --new-tokens 8 --grid 2 16 16   # CPU, small
    python -m bench.bench_model --seven-b --device cuda --dtype bfloat16 --new-tokens 256 \
        --batch-sizes 16 1 auto --engines static static-unfused@16 compiled@16   # the engine's batches

A Qwen2.5-VL with random weights and the real architecture; `--seven-b` gives Qwen2.5-VL-7B's
shapes (LLM 7.6 B, vision tower 0.68 B), built on the device. Needs only torch, transformers and
this repository (no flash-attn, no Ray, no network). Each clip is one video of `--grid` patches
(default 8 x 32 x 32: 16 frames at 448x448 -> 2,048 visual tokens) and the same prompt, so a
batch has no padding. Per batch size and variant, in one run on one machine state:

* vision tower: `get_video_features` on the batch's pixels, ms per clip, with the batched window
  attention and fused norms (v2drop.vision); the stock tower (per-window loop, transformers'
  norms) is timed once at batch 1 for comparison.
* prefill: one forward over the prompt with the encoder output precomputed, ms per clip.
* decode: (generate - the engine's own prefill) / (new tokens - 1), ms per step for the whole
  batch; the engine's prefill ends when its first token's logits exist (a CUDA event recorded
  by a logits processor, no sync), so each engine's fused or unfused prefill is its own.
* total per clip = (vision + generate) / batch; clips/s and output tokens/s from it.
* peak memory: torch.cuda.max_memory_allocated over vision + generate (CUDA); the KV cache
  bytes after generate everywhere.
* aten calls and host-device syncs of one decode step and of one prefill at batch 1 (bench.op_counts),
  stock vs V²Drop; that prefill's wall time eager and replayed from a CUDA graph (v2drop.prefill_graphs),
  and on CUDA its kernel time (where the batch-1 prefill ratio goes).
* `--batch-sizes ... auto`: each variant at its own batch, the clips per call the model stage
  would choose from the memory budget (bench.engine_batch over workers.call_size and
  v2drop.memory; `--memory-budget-gib` forces a budget, which CPU runs need); such rows carry
  batch_chosen_by 'engine' (else 'fixed'), and the targets "batch chosen by the engine" use them.
* two decode engines: `dynamic` (generate() on a DynamicCache) and `static` (v2drop.static_decode:
  per-stage preallocated cache, one static-shape step, captured as a CUDA graph on CUDA after a
  check that captured and uncaptured tokens agree; if capture fails the run goes on uncaptured
  and the report says why). `--engines ... compiled` adds the static engine with its step through
  torch.compile (v2drop.static_decode, compile=True; one compile per batch size, about a minute
  each on a GPU, so it is not in the default run). `--engines ... static-unfused` adds the static
  engine with transformers' own RMSNorms, rotary and projections (prefill and step), and the tower
  is timed batched with transformers' norms too: what v2drop.kernels' fused ones buy, side by side.
  `ENGINE@BATCH` runs an engine at that one fixed batch only, beside the others: a comparison
  (the report sets each beside `static`), while the targets read an engine run at every batch.

Variants run interleaved and the median of `--repeats` is reported, after one warm-up round.
Writes bench/results/model-<device>[-7b].json and .md (or into --out-dir). The model and clips
are built in `bench.model_setup`, the one-off checks are in `bench.model_checks`, the targets
and the Markdown in `bench.model_report`; this module holds the arguments and the timed table.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

import v2drop
from bench import report as report_file
from bench.bench_v2drop import hardware
from bench.engine_batch import AUTO, FIXED, MAX_AUTO_BATCH, batch_groups, batch_size_arg, budget_bytes, engine_batches
from bench.model_checks import (
    check_capture,
    prefill_flop_ratio,
    prefill_profile,
    step_counts,
    step_profile,
    vision_loop_vs_batched,
)
from bench.model_report import markdown, rows_table, targets
from bench.model_setup import (
    ENGINES,
    build_model,
    clip_batch,
    encode,
    engine_arg,
    engines_at,
    fresh,
    parse_engine,
    run_generate,
    set_variant,
    text_inputs,
)
from bench.report import RESULTS_DIR, timed


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seven-b", action="store_true", help="Qwen2.5-VL-7B shapes, LLM and vision tower")
    p.add_argument("--num-layers", type=int, default=28)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=1376)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-hidden-size", type=int, default=64)
    p.add_argument("--grid", type=int, nargs=3, default=(8, 32, 32), help="video grid t h w in patches")
    p.add_argument("--batch-sizes", type=batch_size_arg, nargs="+", default=(1, 16, 64),
                   help=f"clips per call; '{AUTO}': each variant at the batch the model stage would choose")
    p.add_argument("--memory-budget-gib", type=float, default=None,
                   help=f"the budget '{AUTO}' sizes calls for (actors.memory_budget_gib); default on CUDA: "
                        "actors.memory_fraction of the memory free after building the model; needed elsewhere")
    p.add_argument("--max-auto-batch", type=int, default=MAX_AUTO_BATCH,
                   help=f"the most clips an '{AUTO}' batch holds (stands in for actors.batch_size)")
    p.add_argument("--new-tokens", type=int, nargs="+", default=(64, 256))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--engines", type=engine_arg, nargs="+", default=ENGINES,
                   help="dynamic: generate() on a DynamicCache; static: v2drop.static_decode; compiled: static "
                        "with its step through torch.compile; static-unfused: static with transformers' norms, "
                        "rotary and projections; ENGINE@BATCH: that engine at that one fixed batch size only")
    p.add_argument("--capture", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the static decode step as a CUDA graph; default: on CUDA")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.capture is None:
        args.capture = args.device.startswith("cuda")
    if min(args.new_tokens) < 2:
        p.error("--new-tokens must be >= 2 (decode ms/step needs at least one step after the prefill)")
    if args.memory_budget_gib is not None and args.memory_budget_gib <= 0:
        p.error(f"--memory-budget-gib must be > 0, got {args.memory_budget_gib}")
    if args.max_auto_batch < 1:
        p.error(f"--max-auto-batch must be >= 1, got {args.max_auto_batch}")
    engines = [parse_engine(spec) for spec in args.engines]
    if len({name for name, _ in engines}) < len(engines):
        p.error(f"--engines names an engine twice: {' '.join(args.engines)}")
    if all(only is not None for _, only in engines):
        p.error("--engines needs one engine without '@BATCH' (the targets read an engine run at every batch)")
    for spec, (_, only) in zip(args.engines, engines):
        if only not in (None, *args.batch_sizes):
            p.error(f"--engines {spec}: its batch is not in --batch-sizes")
    if AUTO in args.batch_sizes and args.memory_budget_gib is None and not args.device.startswith("cuda"):
        p.error(f"--batch-sizes {AUTO} on {args.device} needs --memory-budget-gib (only CUDA has a free-memory figure)")
    return args


def timed_median(fn, repeats: int, device: str):
    """Median ms of `repeats` calls after one warm-up call; the calls' results."""
    fn()
    times, outs = [], []
    for _ in range(repeats):
        ms, out = timed(fn, device)
        times.append(ms)
        outs.append(out)
    return statistics.median(times), outs


def measure_batch(model, tokenizer, args, schedule, batch: int, variants: tuple[str, ...], chosen_by: str) -> list[dict]:
    """Rows for one batch size: each of `variants` x engine x new-token count. The vision tower
    runs the whole batch in one call, as a model call of that many clips does in the stage; the
    memory model's vision term is below its per-clip bytes, so an auto batch fits it too."""
    clips = clip_batch(model, tokenizer, args.grid, batch, args.device)
    vision_ms, (encoded, *_) = timed_median(lambda: encode(model, clips), args.repeats, args.device)
    inputs = text_inputs(clips, encoded)
    engines = engines_at(args.engines, batch if chosen_by == FIXED else None)
    rows = []
    for variant in variants:
        set_variant(model, variant, schedule)
        prefill_ms = timed_median(lambda: model(**fresh(inputs), use_cache=True, logits_to_keep=1),
                                  args.repeats, args.device)[0]  # its cache freed: peaks are each engine's own
        tokens_by_engine = {}
        for engine in engines:
            for new_tokens in args.new_tokens:
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                generate_ms, runs = timed_median(
                    lambda n=new_tokens, e=engine: run_generate(model, inputs, n, e, args), args.repeats, args.device)
                peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
                kv_bytes, tokens, _ = runs[-1]
                engine_prefill_ms = statistics.median(first_ms for _, _, first_ms in runs)
                rows.append(row(variant, engine, batch, chosen_by, new_tokens, vision_ms, prefill_ms, engine_prefill_ms,
                                generate_ms, peak, kv_bytes))
                tokens_by_engine[engine, new_tokens] = tokens
                print(f"{variant} {engine} batch {batch} {new_tokens} tokens: {generate_ms:.0f} ms", file=sys.stderr, flush=True)
        for r in rows[-len(engines) * len(args.new_tokens):]:
            r["tokens_equal_dynamic"] = token_agreement(tokens_by_engine, r["engine"], r["new_tokens"])
    return rows


def token_agreement(tokens_by_engine: dict, engine: str, new_tokens: int) -> float | None:
    """Mean number of leading greedy tokens equal to the dynamic engine's, as a fraction of the new
    tokens (1.0: identical; None without a dynamic run). In bf16 the static and dynamic steps use
    different kernels, so a near-tie on random weights may flip a token and everything after it;
    on CPU float32 the tests require identity, and `--dtype float32` on a GPU checks the same."""
    if ("dynamic", new_tokens) not in tokens_by_engine:
        return None
    mine, ref = tokens_by_engine[engine, new_tokens], tokens_by_engine["dynamic", new_tokens]
    leading = (mine == ref).long().cumprod(dim=1).sum(dim=1)
    return (leading.float().mean() / new_tokens).item()


def row(variant, engine, batch, chosen_by, new_tokens, vision_ms, prefill_ms, engine_prefill_ms, generate_ms, peak,
        kv_bytes) -> dict:
    """prefill_ms: the model's forward over the prompt (the same for every engine: the V²Drop vs
    stock ratios); engine_prefill_ms: this engine's call up to its first token's logits, which
    decode_ms_per_step leaves out (the static engines' prefill runs fused kernels)."""
    total_ms = vision_ms + generate_ms
    return {
        "variant": variant, "engine": engine, "batch": batch, "batch_chosen_by": chosen_by, "new_tokens": new_tokens,
        "vision_ms_per_clip": vision_ms / batch,
        "prefill_ms_per_clip": prefill_ms / batch,
        "engine_prefill_ms_per_clip": engine_prefill_ms / batch,
        "decode_ms_per_step": (generate_ms - engine_prefill_ms) / (new_tokens - 1),
        "total_ms_per_clip": total_ms / batch,
        "clips_per_s": batch / total_ms * 1e3,
        "output_tokens_per_s": batch * new_tokens / total_ms * 1e3,
        "peak_cuda_bytes": peak,
        "kv_cache_bytes": kv_bytes,
    }


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = build_model(args)
    schedule = v2drop.Schedule.for_retention(args.num_layers, args.retention)
    auto = None
    if AUTO in args.batch_sizes:  # the budget from the memory free after building, before the checks hold any
        budget = budget_bytes(args.device, args.memory_budget_gib)
        assert budget is not None, "parse_args requires --memory-budget-gib off CUDA"
        auto = engine_batches(model, tokenizer, args, schedule, budget)
        print(f"{AUTO} batches: {auto['batch']}", file=sys.stderr, flush=True)
    vision_ms = vision_loop_vs_batched(model, tokenizer, args)  # leaves the batched tower installed
    decode_counts, static_counts, prefill_counts, static_prefill_counts = step_counts(model, tokenizer, args, schedule)
    flop_ratio = prefill_flop_ratio(model, tokenizer, args, schedule)
    capture_error = check_capture(model, tokenizer, args, schedule)
    t, h, w = args.grid
    stem = args.out_dir / f"model-{args.device.split(':')[0]}{'-7b' if args.seven_b else ''}"
    rows: list[dict] = []
    failed: list[dict] = []  # batches that ran out of memory: the run goes on without them
    for size in args.batch_sizes:  # a partial table is written after each batch size
        for batch, variants, chosen_by in batch_groups(size, auto):
            error = None
            try:
                rows += measure_batch(model, tokenizer, args, schedule, batch, variants, chosen_by)
            except torch.OutOfMemoryError as oom:
                error = f"batch {batch} {'/'.join(variants)}: {str(oom)[:200]}"
            if error:  # out of the except clause: its traceback no longer holds the batch's tensors
                failed.append({"batch": batch, "variants": list(variants), "error": error})
                print(f"out of memory: {error}", file=sys.stderr, flush=True)
                gc.collect()
                torch.cuda.empty_cache()
            report_file.write(stem.with_name(stem.name + "-partial"), {"rows": rows, "failed_batches": failed},
                              rows_table(rows), quiet=True)
    measured = sorted({r["batch"] for r in rows})
    profile_batch = 16 if 16 in measured else measured[0]
    steps = step_profile(model, tokenizer, args, schedule, profile_batch)
    machine = hardware(args.device)
    profile = prefill_profile(model, tokenizer, args, schedule)  # last: it records CUDA graphs of its own
    report = {
        "hardware": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out_dir"},
        "weights": "random (seeded); real Qwen2.5-VL architecture",
        "num_params": sum(p.numel() for p in model.parameters()),
        "visual_tokens": t * h * w // 4,
        "schedule": {"layers": list(schedule.layers), "keep": list(schedule.keep)},
        "auto_batch": auto,
        "prefill_flop_ratio": flop_ratio,
        "vision_batch1": vision_ms,
        "static_step_captured": args.capture,
        "capture_error": capture_error,
        "decode_step_counts": decode_counts,
        "static_step_counts": static_counts,
        "prefill_counts": prefill_counts,
        "static_prefill_counts": static_prefill_counts,
        "prefill_profile": profile,
        "rows": rows,
        "failed_batches": failed,
        "targets": targets(rows, flop_ratio, profile),
        "profile_batch": profile_batch,
        "step_profile": steps,
        "wall_s": time.perf_counter() - started,
    }
    report_file.write(stem, report, markdown(report))
    print(f"in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
