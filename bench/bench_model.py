"""Whole-model cost per clip: vision tower, LLM prefill, decode; stock vs V²Drop side by side.

    python -m bench.bench_model --seven-b --device cuda --dtype bfloat16     # one GPU, < 8 min
    python -m bench.bench_model --batch-sizes 1 4 --new-tokens 8 --grid 2 16 16   # CPU, small

A Qwen2.5-VL with random weights and the real architecture; `--seven-b` gives Qwen2.5-VL-7B's
shapes (LLM 7.6 B, vision tower 0.68 B), built on the device. Needs only torch, transformers and
this repository (no flash-attn, no Ray, no network). Each clip is one video of `--grid` patches
(default 8 x 32 x 32: 16 frames at 448x448 -> 2,048 visual tokens) and the same prompt, so a
batch has no padding. Per batch size and variant, in one run on one machine state:

* vision tower: `get_video_features` on the batch's pixels, ms per clip, with the batched window
  attention (v2drop.vision); the stock per-window loop is timed once at batch 1 for comparison.
* prefill: one forward over the prompt with the encoder output precomputed, ms per clip.
* decode: (generate - prefill) / (new tokens - 1), ms per step for the whole batch.
* total per clip = (vision + generate) / batch; clips/s and output tokens/s from it.
* peak memory: torch.cuda.max_memory_allocated over vision + generate (CUDA); the KV cache
  bytes after generate everywhere.
* aten calls and host-device syncs of one decode step (bench.op_counts), stock vs V²Drop.
* two decode engines: `dynamic` (generate() on a DynamicCache) and `static` (v2drop.static_decode:
  per-stage preallocated cache, one static-shape step, captured as a CUDA graph on CUDA after a
  check that captured and uncaptured tokens agree; if capture fails the run goes on uncaptured
  and the report says why).

Variants run interleaved and the median of `--repeats` is reported, after one warm-up round.
Writes bench/results/model-<device>[-7b].json and .md (or into --out-dir).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import v2drop
from bench import report as report_file
from bench.bench_v2drop import SEVEN_B, hardware, kv_cache_bytes
from bench.op_counts import decode_step_counts
from bench.report import timed
from v2drop import static_decode, vision
from v2drop.compat import output_cache
from vlm import tiny

VARIANTS = ("stock", "v2drop")
ENGINES = ("dynamic", "static")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Qwen2.5-VL-7B's vision tower (config.json of Qwen/Qwen2.5-VL-7B-Instruct)
SEVEN_B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      fullatt_block_indexes=[7, 15, 23, 31])
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch²
# The targets (H200, 7B shapes, bf16, 16 x 448x448 frames, 256 new tokens)
TARGETS = dict(total_ms_per_clip_v2drop=150.0, clips_per_s_ratio=1.5, decode_ms_per_step_batch16=8.0,
               vision_ms_per_clip=60.0, prefill_time_ratio_batch1=0.40, prefill_ratio_vs_flop_ratio=0.10)


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
    p.add_argument("--batch-sizes", type=int, nargs="+", default=(1, 16, 64))
    p.add_argument("--new-tokens", type=int, nargs="+", default=(64, 256))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES,
                   help="dynamic: generate() on a DynamicCache; static: v2drop.static_decode")
    p.add_argument("--capture", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the static decode step as a CUDA graph; default: on CUDA")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.capture is None:
        args.capture = args.device.startswith("cuda")
    if min(args.new_tokens) < 2:
        p.error("--new-tokens must be >= 2 (decode ms/step needs at least one step after the prefill)")
    return args


# -- set-up ------------------------------------------------------------------------------


def build_model(args):
    tokenizer = tiny.build_tokenizer("qwen2_5_vl")
    shape = SEVEN_B if args.seven_b else dict(
        hidden_size=args.hidden_size, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size)
    config = tiny.build_config("qwen2_5_vl", tokenizer, num_layers=args.num_layers, **shape,
                               vision_hidden_size=args.vision_hidden_size, vision_depth=args.vision_depth)
    if args.seven_b:
        for key, value in SEVEN_B_VISION.items():
            setattr(config.vision_config, key, value)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = args.attn
    model = tiny.build_model(config, device=args.device).to(getattr(torch, args.dtype))
    return model, tokenizer


def clip_batch(model, tokenizer, grid, batch: int, device) -> dict:
    """`batch` copies of one prompt holding a video of `grid` patches, with its pixels."""
    t, h, w = grid
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe this video in detail."}]}],
        tokenize=False, add_generation_prompt=True,
    ).replace("<|video_pad|>", "<|video_pad|>" * (t * h * w // 4), 1)
    input_ids = torch.tensor([tokenizer(text)["input_ids"]] * batch, device=device)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    pixels = torch.randn(t * h * w, PATCH_DIM, generator=torch.Generator().manual_seed(0))
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": 2 * (input_ids == video_id).int(),
        "video_grid_thw": torch.tensor([[t, h, w]] * batch, device=device),
        "second_per_grid_ts": torch.tensor([1.0] * batch, device=device),
        "pixels": pixels.to(device, model.dtype).repeat(batch, 1),
    }


def text_inputs(clips: dict, encoded) -> dict:
    """generate()'s inputs with the encoder output given; every call gets its own dicts (generate pops)."""
    inputs = {k: v for k, v in clips.items() if k != "pixels"}
    inputs["mm_encoder_outputs"] = {"video": encoded}
    return inputs


def fresh(inputs: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in inputs.items()}


def set_variant(model, variant: str, schedule) -> None:
    if variant == "stock":
        v2drop.disable(model)
    else:
        v2drop.enable(model, schedule)


# -- measurement -------------------------------------------------------------------------




@torch.no_grad()
def encode(model, clips: dict):
    return model.model.get_video_features(clips["pixels"], clips["video_grid_thw"], return_dict=True)


@torch.no_grad()
def run_generate(model, inputs: dict, new_tokens: int, engine: str, args):
    """Exactly `new_tokens` greedy steps per row (the static engine checks for finished rows only
    at the end, as generate's min_new_tokens keeps every row going); returns (KV-cache bytes or
    None, the new tokens [B, new_tokens])."""
    if engine == "dynamic":
        out = model.generate(**fresh(inputs), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True)
        return kv_cache_bytes(output_cache(out)), out.sequences[:, -new_tokens:]
    tokens = static_decode.generate_static(model, fresh(inputs), new_tokens, capture=args.capture,
                                           stop_check_every=new_tokens)
    return None, tokens


def timed_median(fn, repeats: int, device: str):
    """Median ms of `repeats` calls after one warm-up call; the last call's result."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        ms, out = timed(fn, device)
        times.append(ms)
    return statistics.median(times), out


def measure_batch(model, tokenizer, args, schedule, batch: int) -> list[dict]:
    """Rows for one batch size: every variant x engine x new-token count."""
    clips = clip_batch(model, tokenizer, args.grid, batch, args.device)
    vision_ms, encoded = timed_median(lambda: encode(model, clips), args.repeats, args.device)
    inputs = text_inputs(clips, encoded)
    rows = []
    for variant in VARIANTS:
        set_variant(model, variant, schedule)
        prefill_ms, _ = timed_median(lambda: model(**fresh(inputs), use_cache=True, logits_to_keep=1),
                                     args.repeats, args.device)
        tokens_by_engine = {}
        for engine in args.engines:
            for new_tokens in args.new_tokens:
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                generate_ms, (kv_bytes, tokens) = timed_median(
                    lambda n=new_tokens, e=engine: run_generate(model, inputs, n, e, args), args.repeats, args.device)
                peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
                rows.append(row(variant, engine, batch, new_tokens, vision_ms, prefill_ms, generate_ms, peak, kv_bytes))
                tokens_by_engine[engine, new_tokens] = tokens
                print(f"{variant} {engine} batch {batch} {new_tokens} tokens: {generate_ms:.0f} ms", file=sys.stderr, flush=True)
        for r in rows[-len(args.engines) * len(args.new_tokens):]:
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


def row(variant, engine, batch, new_tokens, vision_ms, prefill_ms, generate_ms, peak, kv_bytes) -> dict:
    total_ms = vision_ms + generate_ms
    return {
        "variant": variant, "engine": engine, "batch": batch, "new_tokens": new_tokens,
        "vision_ms_per_clip": vision_ms / batch,
        "prefill_ms_per_clip": prefill_ms / batch,
        "decode_ms_per_step": (generate_ms - prefill_ms) / (new_tokens - 1),
        "total_ms_per_clip": total_ms / batch,
        "clips_per_s": batch / total_ms * 1e3,
        "output_tokens_per_s": batch * new_tokens / total_ms * 1e3,
        "peak_cuda_bytes": peak,
        "kv_cache_bytes": kv_bytes,
    }


def check_capture(model, tokenizer, args, schedule) -> str | None:
    """The captured static step must give the uncaptured step's tokens; otherwise the run goes on
    uncaptured and the report says why."""
    if not args.capture or "static" not in args.engines:
        return None
    clips = clip_batch(model, tokenizer, args.grid, 2, args.device)
    inputs = text_inputs(clips, encode(model, clips))
    try:
        for variant in VARIANTS:
            set_variant(model, variant, schedule)
            eager = static_decode.generate_static(model, fresh(inputs), 8, capture=False, stop_check_every=8)
            captured = static_decode.generate_static(model, fresh(inputs), 8, capture=True, stop_check_every=8)
            if not torch.equal(eager, captured):
                raise RuntimeError(f"{variant}: captured tokens {captured.tolist()} != uncaptured {eager.tolist()}")
        return None
    except Exception as error:  # noqa: BLE001 - the run goes on uncaptured and the report says why
        args.capture = False
        return f"{type(error).__name__}: {str(error)[:300]}"


def vision_loop_vs_batched(model, tokenizer, args) -> dict:
    """The vision tower at batch 1, stock per-window loop vs batched sdpa calls (ms per clip)."""
    clips = clip_batch(model, tokenizer, args.grid, 1, args.device)
    times = {}
    for name, switch in (("stock_loop", vision.uninstall), ("batched", vision.install)):
        switch(model)
        encode(model, clips)  # warm-up
        times[f"{name}_ms"] = statistics.median(timed(lambda: encode(model, clips), args.device)[0]
                                                for _ in range(max(args.repeats, 1)))
    return times


def prefill_flop_ratio(model, tokenizer, args, schedule) -> float:
    set_variant(model, "v2drop", schedule)
    clips = clip_batch(model, tokenizer, args.grid, 1, args.device)
    with torch.no_grad():
        model(**fresh(text_inputs(clips, encode(model, clips))), use_cache=True, logits_to_keep=1)
    stats = v2drop.last_stats(model)[0]
    return stats["prefill_flops"] / stats["prefill_flops_full"]


def step_counts(model, tokenizer, args, schedule) -> dict:
    clips = clip_batch(model, tokenizer, args.grid, 1, args.device)
    inputs = text_inputs(clips, encode(model, clips))
    counts = {}
    for variant in VARIANTS:
        set_variant(model, variant, schedule)
        counts[variant] = decode_step_counts(model, inputs).as_dict()
    return counts


def kernel_ms(fn) -> dict[str, tuple[float, int]]:
    """GPU kernel time (ms) and launches per kernel name while `fn` runs (CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: (e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.self_device_time_total > 0}


@torch.no_grad()
def step_profile(model, tokenizer, args, schedule, batch: int, steps: int = 16) -> dict:
    """Where one decode step's time goes (CUDA only), per variant and engine: a run of 1 + `steps`
    tokens minus a run of 1 token (its prefill), per step. Wall time per step beside GPU kernel
    time per step: wall well above kernel time means the step is bound by launch overhead."""
    if not args.device.startswith("cuda"):
        return {}
    clips = clip_batch(model, tokenizer, args.grid, batch, args.device)
    inputs = text_inputs(clips, encode(model, clips))
    out = {}
    for variant in VARIANTS:
        set_variant(model, variant, schedule)
        for engine in args.engines:
            try:
                def call(n: int, engine: str = engine) -> object:
                    return run_generate(model, inputs, n, engine, args)

                call(steps + 1)  # warm-up
                wall_ms = (timed(lambda c=call: c(steps + 1), args.device)[0] - timed(lambda c=call: c(1), args.device)[0]) / steps
                one, many = kernel_ms(lambda c=call: c(1)), kernel_ms(lambda c=call: c(steps + 1))
                per_step = {k: ((ms - one.get(k, (0, 0))[0]) / steps, (n - one.get(k, (0, 0))[1]) / steps)
                            for k, (ms, n) in many.items()}
                top = sorted(per_step.items(), key=lambda kv: -kv[1][0])[:6]
                out[f"{variant}/{engine}"] = {
                    "wall_ms_per_step": wall_ms,
                    "kernel_ms_per_step": sum(ms for ms, _ in per_step.values()),
                    "launches_per_step": sum(n for _, n in per_step.values()),
                    "top": [(k[:70], round(ms, 3), round(n, 1)) for k, (ms, n) in top],
                }
            except Exception as error:  # noqa: BLE001 - a profile is a diagnostic; the run goes on
                out[f"{variant}/{engine}"] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return out


# -- report ------------------------------------------------------------------------------


def targets(rows: list[dict], flop_ratio: float) -> list[dict]:
    """Each target with the measured figure; `met` False and `off_by` say by how much it is missed.
    Figures come from the fastest engine measured (static when it ran) unless a target says otherwise."""
    engine = "static" if any(r["engine"] == "static" for r in rows) else "dynamic"
    by = {(r["variant"], r["batch"], r["new_tokens"]): r for r in rows if r["engine"] == engine}
    longest = max(r["new_tokens"] for r in rows)
    batches = sorted({r["batch"] for r in rows})
    out = []

    def add(name, measured, goal, lower_is_better=True):
        met = measured <= goal if lower_is_better else measured >= goal
        out.append({"target": f"{name} [{engine}]", "measured": measured, "goal": goal, "met": met,
                    "off_by": measured / goal if goal else None})

    add(f"whole model with V²Drop, best batch, ms/clip ({longest} tokens)",
        min(by["v2drop", b, longest]["total_ms_per_clip"] for b in batches), TARGETS["total_ms_per_clip_v2drop"])
    big = batches[-1]
    add(f"clips/s V²Drop / stock at batch {big}",
        by["v2drop", big, longest]["clips_per_s"] / by["stock", big, longest]["clips_per_s"],
        TARGETS["clips_per_s_ratio"], lower_is_better=False)
    if 16 in batches:
        for variant in VARIANTS:
            add(f"decode ms/step at batch 16, {variant}", by[variant, 16, longest]["decode_ms_per_step"],
                TARGETS["decode_ms_per_step_batch16"])
    add("vision tower ms/clip (batched, best batch)", min(r["vision_ms_per_clip"] for r in rows),
        TARGETS["vision_ms_per_clip"])
    ratio = lambda b: by["v2drop", b, longest]["prefill_ms_per_clip"] / by["stock", b, longest]["prefill_ms_per_clip"]
    add(f"prefill time ratio at batch {batches[0]}", ratio(batches[0]), TARGETS["prefill_time_ratio_batch1"])
    for b in (b for b in batches if b >= 16):
        add(f"|prefill time ratio / FLOP ratio - 1| at batch {b}", abs(ratio(b) / flop_ratio - 1),
            TARGETS["prefill_ratio_vs_flop_ratio"])
    key = "peak_cuda_bytes" if rows[0]["peak_cuda_bytes"] is not None else "kv_cache_bytes"
    pairs = [(r, s) for r in rows for s in rows if r["variant"] == "v2drop" and s["variant"] == "stock"
             and (r["engine"], r["batch"], r["new_tokens"]) == (s["engine"], s["batch"], s["new_tokens"])
             and r[key] and s[key]]
    add(f"peak memory V²Drop / stock, worst batch ({key}, all engines)", max(r[key] / s[key] for r, s in pairs), 1.0)
    return out


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        f"# Whole-model benchmark ({report['hardware']})", "",
        f"Qwen2.5-VL architecture, {report['num_params'] / 1e9:.2f} B parameters ({report['weights']}); "
        f"{a['dtype']}, {a['attn']}; video grid {tuple(a['grid'])} -> {report['visual_tokens']} visual tokens per clip; "
        f"V²Drop schedule {report['schedule']} (prefill FLOP ratio {report['prefill_flop_ratio']:.3f}); "
        f"median of {a['repeats']} interleaved repeats after a warm-up.", "",
        f"Engines: dynamic = generate() on a DynamicCache; static = v2drop.static_decode, step "
        f"{'captured (CUDA graphs)' if report['static_step_captured'] else 'uncaptured'}"
        + (f" (capture failed: {report['capture_error']})" if report["capture_error"] else "") + ".", "",
        "| variant | engine | batch | new tokens | vision ms/clip | prefill ms/clip | decode ms/step | total ms/clip | clips/s | output tok/s | peak MiB | KV MiB | leading tokens = dynamic |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = lambda n: f"{n / 2**20:.1f}" if n else "n/a"
    for r in report["rows"]:
        lines.append(
            f"| {r['variant']} | {r['engine']} | {r['batch']} | {r['new_tokens']} | {r['vision_ms_per_clip']:.1f} | "
            f"{r['prefill_ms_per_clip']:.1f} | {r['decode_ms_per_step']:.2f} | {r['total_ms_per_clip']:.1f} | "
            f"{r['clips_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | {mib(r['peak_cuda_bytes'])} | {mib(r['kv_cache_bytes'])} | "
            f"{'n/a' if r.get('tokens_equal_dynamic') is None else format(r['tokens_equal_dynamic'], '.2f')} |")
    v = report["vision_batch1"]
    c = report["decode_step_counts"]
    lines += [
        "", f"Vision tower at batch 1: stock per-window loop {v['stock_loop_ms']:.1f} ms, "
        f"batched sdpa {v['batched_ms']:.1f} ms ({v['stock_loop_ms'] / v['batched_ms']:.2f}x).", "",
        "One decode step at batch 1 (aten calls / host-device syncs): " + ", ".join(
            f"{name} {n['op_calls']} / {n['syncs']}" for name, n in c.items()) + ".", "",
        "| target | measured | goal | met | measured / goal |", "|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['measured']:.3f} | {t['goal']} | {'yes' if t['met'] else 'NO'} | "
                     f"{t['off_by']:.2f} |")
    for name, p in report.get("step_profile", {}).items():
        if "error" in p:
            lines.append(f"\nProfile {name}: {p['error']}")
            continue
        lines.append(f"\nProfile of one decode step, {name}, batch {report['profile_batch']}: wall "
                     f"{p['wall_ms_per_step']:.2f} ms/step, GPU kernels {p['kernel_ms_per_step']:.2f} ms/step in "
                     f"{p['launches_per_step']:.0f} launches. Top kernels (ms/step, launches/step): "
                     + "; ".join(f"{k} {ms} x{n}" for k, ms, n in p["top"]))
    if not report["hardware"].startswith("NVIDIA"):
        lines += ["", "Not on the GPU the targets are set for: the targets table shows the report's shape, not a claim."]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    model, tokenizer = build_model(args)
    schedule = v2drop.Schedule.for_retention(args.num_layers, args.retention)
    vision_ms = vision_loop_vs_batched(model, tokenizer, args)  # leaves the batched tower installed
    counts = step_counts(model, tokenizer, args, schedule)
    flop_ratio = prefill_flop_ratio(model, tokenizer, args, schedule)
    capture_error = check_capture(model, tokenizer, args, schedule)
    t, h, w = args.grid
    stem = args.out_dir / f"model-{args.device.split(':')[0]}{'-7b' if args.seven_b else ''}"
    rows = []
    for batch in args.batch_sizes:  # a partial table is written after each batch size
        rows += measure_batch(model, tokenizer, args, schedule, batch)
        report_file.write(stem.with_name(stem.name + "-partial"), {"rows": rows}, "", quiet=True)
    profile_batch = 16 if 16 in args.batch_sizes else args.batch_sizes[0]
    report = {
        "hardware": hardware(args.device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out_dir"},
        "weights": "random (seeded); real Qwen2.5-VL architecture",
        "num_params": sum(p.numel() for p in model.parameters()),
        "visual_tokens": t * h * w // 4,
        "schedule": {"layers": list(schedule.layers), "keep": list(schedule.keep)},
        "prefill_flop_ratio": flop_ratio,
        "vision_batch1": vision_ms,
        "static_step_captured": args.capture,
        "capture_error": capture_error,
        "decode_step_counts": counts,
        "rows": rows,
        "targets": targets(rows, flop_ratio),
        "profile_batch": profile_batch,
        "step_profile": step_profile(model, tokenizer, args, schedule, profile_batch),
        "wall_s": time.perf_counter() - started,
    }
    report_file.write(stem, report, markdown(report))
    print(f"in {report['wall_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
