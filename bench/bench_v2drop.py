"""Language-model prefill and generation: full model vs V²Drop vs random dropping, side by side.

    python -m bench.bench_v2drop                       # CPU, 28 layers, 2,048 visual tokens
    python -m bench.bench_v2drop --seven-b --device cuda --dtype bfloat16 --attn flash_attention_2

A Qwen2.5-VL with random weights and the real architecture (28 decoder layers). The vision
encoder runs once before timing and its output is handed to `generate` as `mm_encoder_outputs`,
so the timings are the language model's alone (prefill, then a fixed number of new tokens),
as in the paper's "LLM generation latency". Variants run interleaved in every repeat and the
median is reported, so the ratios come from one run on one machine state.

Memory: on CUDA, torch.cuda.max_memory_allocated around generate. On CPU, the KV-cache bytes
after generate (exact), plus each variant's peak resident set size measured in its own
subprocess (coarse: it includes the model weights).
Writes bench/results/v2drop-<device>.json and .md (or into --out-dir).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import v2drop
from bench import report as report_file
from bench.report import RESULTS_DIR, timed
from v2drop.compat import output_cache
from vlm import tiny

VARIANTS = ("full", "v2drop", "random")
SEVEN_B = dict(hidden_size=3584, num_heads=28, num_kv_heads=4, intermediate_size=18944, vocab_size=152064)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=28)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=1376)
    p.add_argument("--seven-b", action="store_true", help="Qwen2.5-VL-7B text shapes (GPU)")
    p.add_argument("--grid", type=int, nargs=3, default=(8, 32, 32), help="video grid t h w in patches")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--no-memory-subprocess", action="store_true")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the .json and .md go")
    p.add_argument("--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- set-up ------------------------------------------------------------------------------


def build_model(args):
    tokenizer = tiny.build_tokenizer("qwen2_5_vl")
    shape = SEVEN_B if args.seven_b else dict(
        hidden_size=args.hidden_size, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
    )
    config = tiny.build_config("qwen2_5_vl", tokenizer, num_layers=args.num_layers, **shape)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = args.attn
    model = tiny.build_model(config, device=args.device).to(getattr(torch, args.dtype))
    return model, tokenizer


def build_inputs(model, tokenizer, grid, device) -> dict:
    """One chat prompt holding a video of `grid` patches; encoder output precomputed."""
    t, h, w = grid
    num_visual = t * h * w // 4
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe this video in detail."}]}],
        tokenize=False, add_generation_prompt=True,
    ).replace("<|video_pad|>", "<|video_pad|>" * num_visual, 1)
    input_ids = torch.tensor([tokenizer(text)["input_ids"]], device=device)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    grid_thw = torch.tensor([[t, h, w]], device=device)
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded = model.model.get_video_features(pixels.to(device, model.dtype), grid_thw, return_dict=True)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": 2 * (input_ids == video_id).int(),
        "video_grid_thw": grid_thw,
        "second_per_grid_ts": torch.tensor([1.0], device=device),
        "mm_encoder_outputs": {"video": encoded},
    }


def set_variant(model, variant: str, schedule) -> None:
    if variant == "full":
        v2drop.disable(model)
    else:
        v2drop.enable(model, schedule, scorer="variation" if variant == "v2drop" else "random")


# -- measurement -------------------------------------------------------------------------




def fresh(inputs: dict) -> dict:
    # generate pops multimodal entries after prefill: give every call its own dict.
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in inputs.items()}


def prefill_ms(model, inputs, device) -> float:
    with torch.no_grad():
        ms, _ = timed(lambda: model(**fresh(inputs), use_cache=True, logits_to_keep=1), device)
    return ms


def generate_ms(model, inputs, new_tokens, device) -> tuple[float, object]:
    with torch.no_grad():
        return timed(
            lambda: model.generate(**fresh(inputs), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, return_dict_in_generate=True),
            device,
        )


def kv_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def measure(args) -> dict:
    model, tokenizer = build_model(args)
    inputs = build_inputs(model, tokenizer, args.grid, args.device)
    schedule = v2drop.Schedule.for_retention(args.num_layers, args.retention)
    timings = {v: {"prefill_ms": [], "generate_ms": []} for v in VARIANTS}
    details = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not recorded
        for variant in VARIANTS:
            set_variant(model, variant, schedule)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            p_ms = prefill_ms(model, inputs, args.device)
            g_ms, out = generate_ms(model, inputs, args.new_tokens, args.device)
            if repeat == 0:
                details[variant] = variant_details(model, variant, out, args)
                continue
            timings[variant]["prefill_ms"].append(p_ms)
            timings[variant]["generate_ms"].append(g_ms)
    return {"schedule": schedule, "timings": timings, "details": details, "num_params": sum(p.numel() for p in model.parameters())}


def variant_details(model, variant, out, args) -> dict:
    stats = v2drop.last_stats(model)[0] if v2drop.is_enabled(model) else None
    details = {
        "kv_cache_bytes": kv_cache_bytes(output_cache(out)),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
    }
    if stats:
        details.update(
            visual_tokens_per_layer=stats["visual_tokens_per_layer"],
            retention=stats["retention"],
            prefill_flops=stats["prefill_flops"],
            prefill_flops_full=stats["prefill_flops_full"],
        )
    return details


def memory_probe(args) -> None:
    """Child process: one variant's generate, then print the process's peak RSS in bytes."""
    model, tokenizer = build_model(args)
    inputs = build_inputs(model, tokenizer, args.grid, args.device)
    set_variant(model, args.memory_probe, v2drop.Schedule.for_retention(args.num_layers, args.retention))
    generate_ms(model, inputs, args.new_tokens, args.device)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def peak_rss_per_variant(argv: list[str]) -> dict:
    peaks = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "bench.bench_v2drop", *argv, "--memory-probe", variant],
                             capture_output=True, text=True, check=True)
        peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    return peaks


# -- report ------------------------------------------------------------------------------


def summarise(args, measured: dict, peaks: dict | None) -> dict:
    details, timings = measured["details"], measured["timings"]
    full_flops = details["v2drop"]["prefill_flops_full"]
    rows = {}
    for variant in VARIANTS:
        flops = details[variant].get("prefill_flops", full_flops)
        rows[variant] = {
            "prefill_ms": statistics.median(timings[variant]["prefill_ms"]),
            "generate_ms": statistics.median(timings[variant]["generate_ms"]),
            "prefill_flops": flops,
            "kv_cache_bytes": details[variant]["kv_cache_bytes"],
            "peak_cuda_bytes": details[variant]["peak_cuda_bytes"],
            "peak_rss_bytes": (peaks or {}).get(variant),
            "retention": details[variant].get("retention", 1.0),
            "visual_tokens_per_layer": details[variant].get("visual_tokens_per_layer"),
        }
    for variant in VARIANTS:
        row, full = rows[variant], rows["full"]
        row["prefill_time_ratio"] = row["prefill_ms"] / full["prefill_ms"]
        row["generate_time_ratio"] = row["generate_ms"] / full["generate_ms"]
        row["prefill_flop_ratio"] = row["prefill_flops"] / full["prefill_flops"]
    v2 = rows["v2drop"]
    return {
        "hardware": hardware(args.device),
        "args": {k: v for k, v in vars(args).items() if k not in ("memory_probe", "out_dir")},
        "schedule": {"layers": list(measured["schedule"].layers), "keep": list(measured["schedule"].keep)},
        "num_params": measured["num_params"],
        "weights": "random (seeded); real Qwen2.5-VL architecture",
        "variants": rows,
        "targets": {
            "prefill_time_ratio_within_15pct_of_flop_ratio":
                abs(v2["prefill_time_ratio"] - v2["prefill_flop_ratio"]) <= 0.15 * v2["prefill_flop_ratio"],
            "peak_memory_not_above_full": memory_not_above_full(rows),
        },
    }


def memory_not_above_full(rows: dict) -> bool:
    key = "peak_cuda_bytes" if rows["full"]["peak_cuda_bytes"] is not None else "peak_rss_bytes"
    if rows["full"][key] is None:
        key = "kv_cache_bytes"
    return rows["v2drop"][key] <= rows["full"][key]


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        f"# V²Drop benchmark ({report['hardware']})",
        "",
        f"Qwen2.5-VL architecture, {a['num_layers']} layers, {report['num_params'] / 1e6:.1f} M parameters, "
        f"{report['weights']}; {a['dtype']}, {a['attn']}; video grid {tuple(a['grid'])} -> "
        f"{report['variants']['v2drop']['visual_tokens_per_layer'][0]} visual tokens; {a['new_tokens']} new tokens; "
        f"median of {a['repeats']} interleaved repeats. Schedule {report['schedule']}.",
        "",
        "| variant | prefill ms | generate ms | prefill time ratio | prefill FLOP ratio | generate ratio | retention | KV cache MiB | peak mem MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["variants"].items():
        peak = r["peak_cuda_bytes"] or r["peak_rss_bytes"]
        lines.append(
            f"| {name} | {r['prefill_ms']:.1f} | {r['generate_ms']:.1f} | {r['prefill_time_ratio']:.3f} | "
            f"{r['prefill_flop_ratio']:.3f} | {r['generate_time_ratio']:.3f} | {r['retention']:.3f} | "
            f"{r['kv_cache_bytes'] / 2**20:.1f} | {peak / 2**20 if peak else float('nan'):.0f} |"
        )
    lines += ["", f"Targets: {report['targets']}", "",
              f"Visual tokens per layer (V²Drop): {report['variants']['v2drop']['visual_tokens_per_layer']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.memory_probe:
        memory_probe(args)
        return
    measured = measure(args)
    peaks = None if args.device.startswith("cuda") or args.no_memory_subprocess else peak_rss_per_variant(argv)
    report = summarise(args, measured, peaks)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"v2drop-{args.device.split(':')[0]}{'-7b' if args.seven_b else ''}"
    report_file.write(stem, report, markdown(report))


if __name__ == "__main__":
    main()
