"""Pipeline throughput on the offline preset, two variants side by side.

    python -m bench.bench_pipeline                     # caption: V²Drop 25 % vs off; ../shared/videos, 16 frames
    python -m bench.bench_pipeline --job qa            # qa (3 questions): shared video prefill vs one per question
    python -m bench.bench_pipeline --videos DIR --repeats 3 --num-frames 8 --max-pixels 50176
    python -m bench.bench_pipeline --model tiny        # the offline preset's own 8-layer model

`--job caption` compares V²Drop at 25 % retention with V²Drop off. `--job qa` runs jobs/qa.yaml
(three questions per clip) at 25 % retention with `generation.share_video_prefix` on and off:
one video prefill per clip against one per question.

Each repeat runs `pipeline.run.run(cfg)` once per variant (the order alternates between repeats),
each into a fresh output folder, on one local Ray cluster started once. Configs come from
the job file with `preset=offline` (CPU, float32, sdpa) plus more visual tokens than the
preset (16 frames, max_pixels 448*448) and a fixed `generation.max_new_tokens`.

The model (`--model`): `bench` (default) is a Qwen2.5-VL with the real architecture, 28 decoder
layers of hidden size 256 and random weights, the shape of bench.bench_v2drop, built once into
the cache by vlm.tiny and loaded as a local-path model.source: its language model is big
enough that dropping visual tokens shows in the model stage. `tiny` is the preset's own
tiny:qwen2_5_vl (8 layers, hidden 64), whose language model costs next to nothing, so there the
benchmark measures decode and Ray overhead. Either is built before timing.

Per variant, the median over repeats of: wall seconds (the run's summary: planning, actor start and
model load, decode, model, write), clips/s, video-seconds/s, output tokens/s, and from the written
rows the mean prefill and generate ms per model batch, the model's prefill and total ms per clip
(every generate call's time summed, over the clips), mean visual tokens per drop stage, retention
achieved and prefill FLOPs saved (1 - sum flops_dropped / sum flops_full). Ratios are first variant /
second, with the FLOP ratio of the summed flops_dropped.

The model has random weights (its text is noise; it may stop at EOS early, so output tokens are
reported), and absolute CPU times are not GPU figures. The 1-minute load average is recorded around
every run: other work on the machine (e.g. a concurrent test suite) shows up there as noise.
Writes bench/results/pipeline-cpu[-qa][-tiny].json and .md (the Markdown is `bench.pipeline_report`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report as report_file
from bench.pipeline_report import markdown, median_row
from bench.report import RESULTS_DIR

REPO = Path(__file__).resolve().parents[1]
# job -> {variant: config overrides}; the first variant is the numerator of every ratio
JOBS = {
    "caption": {"v2drop": ["model.retention=0.25"], "off": ["model.retention=1.0"]},
    "qa": {"shared": ["model.retention=0.25", "generation.share_video_prefix=true"],
           "unshared": ["model.retention=0.25", "generation.share_video_prefix=false"]},
}
TINY_SOURCE = "tiny:qwen2_5_vl"  # what preset=offline loads
BENCH_MODEL = dict(num_layers=28, hidden_size=256)  # bench.bench_v2drop's shape (35.7 M parameters)
MODEL_DESCRIPTIONS = {
    "bench": "Qwen2.5-VL, 28 layers x hidden 256, random weights (vlm.tiny)",
    "tiny": "tiny:qwen2_5_vl, 8 layers x hidden 64, random weights (the offline preset's model)",
}
RATIO_KEYS = ("wall_s", "clips_per_s", "video_s_per_s", "output_tokens_per_s", "prefill_ms_per_batch",
              "generate_ms_per_batch", "inputs_ms_per_clip", "prefill_ms_per_clip", "model_ms_per_clip", "prefill_flops")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", choices=tuple(JOBS), default="caption", help="jobs/<job>.yaml and its two variants")
    p.add_argument("--videos", default=str(REPO.parent / "shared" / "videos"), help="input.uri (folder of videos)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-frames", type=int, default=16, help="decode.num_frames")
    p.add_argument("--max-pixels", type=int, default=448 * 448, help="decode.max_pixels per frame")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation.max_new_tokens")
    p.add_argument("--model", choices=("bench", "tiny"), default="bench",
                   help="bench: 28 layers x hidden 256, random weights; tiny: the preset's tiny:qwen2_5_vl")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "v2drop-bench-cache"), help="model.cache_dir")
    return p.parse_args(argv)


# -- set-up ------------------------------------------------------------------------------


def job_config(args: argparse.Namespace, variant: str, output_dir: Path):
    from pipeline.config import load_job

    return load_job(REPO / "jobs" / f"{args.job}.yaml", [
        "preset=offline", f"input.uri={Path(args.videos).resolve()}", f"output.uri={output_dir}",
        f"model.source={args.model_source}", *JOBS[args.job][variant], f"model.cache_dir={args.cache_dir}",
        f"decode.num_frames={args.num_frames}", f"decode.max_pixels={args.max_pixels}",
        f"generation.max_new_tokens={args.max_new_tokens}",
    ])


def start_ray() -> None:
    import ray

    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}  # workers import pipeline/ and workers/ from here
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False  # the run's own progress lines suffice


def prebuild_model(args: argparse.Namespace) -> str:
    """Build the model now, so no timed run pays for it; returns the model.source to use."""
    from vlm import tiny
    from workers.loading import resolve_model_source

    if args.model == "tiny":
        resolve_model_source(TINY_SOURCE, cache_dir=args.cache_dir)
        return TINY_SOURCE
    # The processor's pixel bound matches decode.max_pixels, so frames keep their visual tokens.
    return str(tiny.build_cached("qwen2_5_vl", Path(args.cache_dir) / "bench", max_pixels=args.max_pixels,
                                 **BENCH_MODEL))


# -- measurement -------------------------------------------------------------------------


def run_variant(args: argparse.Namespace, name: str, repeat: int, scratch: Path) -> dict[str, Any]:
    """One pipeline run into its own fresh folder; the summary and row measurements, then cleanup."""
    from pipeline.run import run

    output_dir = scratch / f"{name}-{repeat}"
    cfg = job_config(args, name, output_dir)
    load_before = os.getloadavg()[0]
    summary = run(cfg, log=lambda line: print(f"  [{name} #{repeat}] {line}", flush=True))
    measured = {**from_summary(summary), **from_rows(read_rows(output_dir, cfg.job)),
                "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0]}
    shutil.rmtree(output_dir, ignore_errors=True)
    return measured


def from_summary(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "wall_s": s["wall_s"], "clips_ok": s["clips_ok"], "rows_ok": s["rows_ok"], "rows_error": s["rows_error"],
        "rows_skipped": s["rows_skipped"], "errors_by_stage": dict(s["errors_by_stage"]),
        "video_seconds": s["video_seconds_processed"], "clips_per_s": s["clips_per_s"],
        "video_s_per_s": s["video_seconds_processed"] / s["wall_s"], "output_tokens": s["output_tokens"],
        "prompt_tokens": s["prompt_tokens"], "output_tokens_per_s": s["output_tokens_per_s"],
        "retention_achieved": s["retention_achieved_mean"], "flops_saved": s["flops_saved_fraction"],
        "model_random_weights": s["model_random_weights"],
    }


def read_rows(output_dir: Path, job: str):
    import pyarrow.compute as pc

    from pipeline._write import job_data_uri
    from pipeline.storage import Storage

    table = Storage().read_parquet(job_data_uri(str(output_dir), job))
    return table.filter(pc.equal(table["status"], "ok"))


def from_rows(ok) -> dict[str, Any]:
    """Per-batch model times (rows of one generate call share started_at/finished_at and times), and
    the model time per clip: the generate calls' times summed (a call's rows share its generate_ms
    and their Ray batch's finished_at), over the clips; the same for the calls' input building
    (inputs_ms, before and outside generate_ms)."""
    rows = ok.select(["clip_id", "started_at", "finished_at", "worker_host", "inputs_ms", "prefill_ms", "generate_ms",
                      "visual_tokens_per_stage", "flops_full", "flops_dropped", "decode_ms"]).to_pylist()
    batches = {(r["worker_host"], r["started_at"], r["finished_at"]): r for r in rows}.values()
    calls = {(r["worker_host"], r["finished_at"], r["generate_ms"]): r for r in rows}.values()
    clips = len({r["clip_id"] for r in rows})
    stages = [r["visual_tokens_per_stage"] for r in rows]
    flops_full, flops_dropped = sum(r["flops_full"] for r in rows), sum(r["flops_dropped"] for r in rows)
    return {
        "model_batches": len(batches),
        "prefill_ms_per_batch": statistics.mean(b["prefill_ms"] for b in batches),
        "generate_ms_per_batch": statistics.mean(b["generate_ms"] for b in batches),
        "decode_ms_per_clip": statistics.mean(r["decode_ms"] for r in rows),
        "model_calls": len(calls),
        "inputs_ms_per_clip": sum(c["inputs_ms"] for c in calls) / clips,
        "prefill_ms_per_clip": sum(c["prefill_ms"] for c in calls) / clips,
        "model_ms_per_clip": sum(c["generate_ms"] for c in calls) / clips,
        "visual_tokens_per_stage": [statistics.mean(s[i] for s in stages) for i in range(min(map(len, stages)))],
        "prefill_flops": flops_dropped, "prefill_flops_full": flops_full,
        "flops_saved_rows": 1 - flops_dropped / flops_full,
    }


def measure(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    variants = list(JOBS[args.job])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        for repeat in range(args.repeats):
            order = variants if repeat % 2 == 0 else variants[::-1]  # alternate who goes first
            for name in order:
                runs[name].append(run_variant(args, name, repeat, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return runs


# -- report ------------------------------------------------------------------------------


def summarise(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    import torch

    from pipeline.config import to_dict

    rows = {name: median_row(repeats) for name, repeats in runs.items()}
    first, second = JOBS[args.job]
    ratios = {key: rows[first][key] / rows[second][key] for key in RATIO_KEYS}
    cfg = to_dict(job_config(args, first, Path("<tmp>")))
    return {
        "hardware": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                    f"(torch {torch.__version__}); local Ray, num_cpus=2",
        "args": vars(args),
        "config": {k: cfg[k] for k in ("decode", "model", "actors", "clips", "generation", "prompt")},
        "variants_overrides": JOBS[args.job],
        "model": MODEL_DESCRIPTIONS[args.model],
        "weights": "random (seeded): outputs are noise; absolute CPU times are not GPU figures",
        "noise": "other work may share the 2 cores (e.g. a concurrent Ray test suite): see load_avg_1m_* per run",
        "variants": rows,
        "ratio": f"{first} / {second}",
        "ratios": ratios,
        "runs": runs,
    }


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-machine Ray, on 127.0.0.1 only
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not Path(args.videos).is_dir():
        sys.exit(f"--videos: {args.videos} is not a folder; give a folder of videos (default ../shared/videos)")
    args.model_source = prebuild_model(args)
    start_ray()
    began = time.perf_counter()
    runs = measure(args)
    report = summarise(args, runs)
    report["bench_wall_s"] = time.perf_counter() - began
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / ("pipeline-cpu" + ("-qa" if args.job == "qa" else "") + ("-tiny" if args.model == "tiny" else ""))
    report_file.write(stem, report, markdown(report))


if __name__ == "__main__":
    main()
