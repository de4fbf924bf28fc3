"""What the quality guard costs: a pipeline run with every clip shadowed, beside one with none.

    python -m bench.bench_guard                      # bench model (28 layers x 256), retention 0.25
    python -m bench.bench_guard --model tiny --repeats 1

Both variants run `pipeline.run.run` on jobs/caption.yaml preset=offline over ../shared/videos at
`model.retention` 0.25, the setup of bench.bench_pipeline (same model, frames and new tokens):
    none    quality.shadow_fraction=0    the run alone
    all     quality.shadow_fraction=1    every clip also run with V²Drop off (workers.shadow)

From the `all` run's rows, per shadowed item: the shadow's ms over the item's own model ms (its
generate calls' time over the items), and the shadow's FLOPs over the item's own prefill FLOPs
(flops_dropped). A run with fraction f pays about f times these on top of its own; the table
gives it for f = 0.02 (the default), 0.05 and 0.1. The wall times of both runs are printed too
(they include Ray start-up and model load). Random weights; CPU times are not GPU figures, only the
ratios mean anything. Writes bench/results/guard-cpu[-tiny].json and .md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import bench_pipeline
from bench import report as report_file

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"none": ["quality.shadow_fraction=0"], "all": ["quality.shadow_fraction=1.0"]}
FRACTIONS = (0.02, 0.05, 0.1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", default=str(REPO.parent / "shared" / "videos"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--max-pixels", type=int, default=448 * 448)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--model", choices=("bench", "tiny"), default="bench")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "v2drop-bench-cache"))
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    return p.parse_args(argv)


def job_config(args: argparse.Namespace, variant: str, output_dir: Path):
    from pipeline.config import load_job

    return load_job(REPO / "jobs" / "caption.yaml", [
        "preset=offline", f"input.uri={Path(args.videos).resolve()}", f"output.uri={output_dir}",
        f"model.source={args.model_source}", "model.retention=0.25", f"model.cache_dir={args.cache_dir}",
        f"decode.num_frames={args.num_frames}", f"decode.max_pixels={args.max_pixels}",
        f"generation.max_new_tokens={args.max_new_tokens}", *VARIANTS[variant],
    ])


def shadow_costs(ok) -> dict[str, Any]:
    """Per shadowed item of a run's ok rows: the shadow's time and FLOPs over the item's own."""
    own = bench_pipeline.from_rows(ok)
    rows = ok.select(["shadow_ms", "shadow_flops", "flops_dropped", "shadow_lcs_ratio"]).to_pylist()
    shadowed = [r for r in rows if r["shadow_ms"] is not None]
    shadow_ms = statistics.mean(r["shadow_ms"] for r in shadowed)
    return {
        "items_shadowed": len(shadowed), "items": len(rows),
        "model_ms_per_item": own["model_ms_per_clip"], "shadow_ms_per_item": shadow_ms,
        "time_ratio": shadow_ms / own["model_ms_per_clip"],
        "flop_ratio": sum(r["shadow_flops"] for r in shadowed) / sum(r["flops_dropped"] for r in shadowed),
        "agreement_mean": statistics.mean(r["shadow_lcs_ratio"] for r in shadowed),
    }


def run_variant(args: argparse.Namespace, variant: str, repeat: int, scratch: Path) -> dict[str, Any]:
    from pipeline.run import run

    output_dir = scratch / f"{variant}-{repeat}"
    cfg = job_config(args, variant, output_dir)
    load_before = os.getloadavg()[0]
    summary = run(cfg, log=lambda line: print(f"  [{variant} #{repeat}] {line}", flush=True))
    measured = {"wall_s": summary["wall_s"], "quality": summary["quality"],
                "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}
    if variant == "all":
        measured.update(shadow_costs(bench_pipeline.read_rows(output_dir, cfg.job)))
    shutil.rmtree(output_dir, ignore_errors=True)
    return measured


def markdown(report: dict[str, Any]) -> str:
    a, runs = report["args"], report["runs"]
    every = runs["all"]
    time_ratio = statistics.median(r["time_ratio"] for r in every)
    flop_ratio = statistics.median(r["flop_ratio"] for r in every)
    lines = [
        "# What the quality guard costs (CPU; random weights)",
        "",
        f"jobs/caption.yaml preset=offline, model.retention 0.25, {bench_pipeline.MODEL_DESCRIPTIONS[a['model']]}, "
        f"{a['num_frames']} frames of <= {a['max_pixels']} px per clip, max_new_tokens {a['max_new_tokens']}; "
        f"{a['repeats']} repeat(s). Only the ratios mean anything.",
        "",
        "| per shadowed item | shadow / the item's own |",
        "|---|---|",
        f"| time (shadow_ms over model ms per item) | {time_ratio:.2f} |",
        f"| prefill FLOPs (shadow_flops over flops_dropped) | {flop_ratio:.2f} |",
        "",
        "| quality.shadow_fraction | extra model time (about) | extra prefill FLOPs |",
        "|---|---|---|",
        *[f"| {f:g} | {100 * f * time_ratio:.1f} % | {100 * f * flop_ratio:.1f} % |" for f in FRACTIONS],
        "",
        f"Items shadowed in the `all` run: {every[0]['items_shadowed']} of {every[0]['items']}; its mean agreement "
        f"(random weights) {every[0]['agreement_mean']:.3f}. The FLOP ratio is analytic and exact; the time ratio "
        f"moves with other work on the machine (1-minute load average around each run below).",
        "",
        "Per run (wall s, load before -> after; time ratio of the `all` runs):",
        *[f"- {name}: " + "; ".join(
            f"{r['wall_s']:.1f} s (load {r.get('load_avg_1m_before', float('nan')):.1f} -> "
            f"{r.get('load_avg_1m_after', float('nan')):.1f})"
            + (f", time ratio {r['time_ratio']:.2f}" if "time_ratio" in r else "")
            for r in rs) for name, rs in runs.items()],
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.model_source = bench_pipeline.prebuild_model(args)
    import ray

    if not ray.is_initialized():
        bench_pipeline.start_ray()
    scratch = Path(tempfile.mkdtemp(prefix="bench-guard-"))
    try:
        runs = {name: [] for name in VARIANTS}
        for repeat in range(args.repeats):
            for name in (VARIANTS if repeat % 2 == 0 else reversed(list(VARIANTS))):
                runs[name].append(run_variant(args, name, repeat, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {"args": vars(args), "runs": runs}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("guard-cpu" + ("-tiny" if args.model == "tiny" else ""))
    report_file.write(stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
