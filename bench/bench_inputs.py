"""The model actor's host work per clip: building a call's inputs with the family's real processor
(resize to the patch grid, normalize, patchify), on the actor's CPU and on the model's GPU.

    python -m bench.bench_inputs                                  # ~10 min on 2 cores: inputs-cpu.{json,md}
    python -m bench.bench_inputs --device cuda --out-dir $OUT     # the GPU run (bench/gpu_run.sh)

The model actor builds each call's inputs before the call, and the GPU waits meanwhile
(workers.device_inputs). Per family, decoded frame size and clips per call, this times, in ms per
clip (median of --repeats):
    rows     the Arrow batch to Python rows (`to_pylist`, as the actor does: the frame bytes are copied)
    cpu      `workers.device_inputs.timed_inputs(build_inputs(...))` with the processor on the CPU, torch
             on --threads threads (a Ray actor with one CPU runs one: Ray sets OMP_NUM_THREADS), and
             the copy to --device in bfloat16: what the model stage did before 2026-12-01
    device   the same with the processor on --device (what the model stage does on a GPU now), to the
             end of the device's work; and `levels`: the largest pixel difference from the CPU's inputs,
             in levels of the 8-bit frames (workers.device_inputs.device_disagreement allows one)
Frames: seeded noise of --frames frames at each --sizes (the decode stage's output: at most
448x448 pixels, so 448x448 for a square source and 336x597 for 16:9, which the Qwen processors
resize to 336x588 and 320x608). The processors are the families' real classes at the checkpoints'
sizes (Qwen: no pixel bound below the frames'; LLaVA-OneVision: SigLIP's 384x384). For scale,
the model's GPU time per clip from the recorded H200 run (bench.report.gpu_ms_per_clip).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from bench import report as report_file
from bench.bench_v2drop import hardware
from bench.report import RESULTS_DIR, gpu_ms_per_clip
from vlm import processing, tiny
from workers.device_inputs import noise_clip_row, one_level, timed_inputs
from workers.model_inputs import build_inputs

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")
QWEN_MAX_PIXELS = 12845056  # the Qwen2.5-VL checkpoints' bound: far above a 448x448 frame
SIGLIP_PX = 384  # LLaVA-OneVision's video frames


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--sizes", nargs="+", default=["448x448", "597x336"], help="decoded frames, WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--clips", nargs="+", type=int, default=[1, 16, 64], help="clips per call (actors.batch_size: 64)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch threads for the CPU processor")
    parser.add_argument("--device", default=None, help="also build on this device (cuda); the suite's toy run: cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def real_size_processor(family: str, cache_dir: Path) -> Any:
    """The family's real processor classes, at the checkpoints' frame sizes (module docstring)."""
    processor = processing.load_processor(tiny.build_cached(family, cache_dir, num_layers=1, max_pixels=QWEN_MAX_PIXELS))
    video = processor.video_processor
    if family == "llava_onevision":
        video.size = type(video.size)(height=SIGLIP_PX, width=SIGLIP_PX)
    return processor


class Target:
    """Where the inputs go: what `timed_inputs` needs of a model (its device and dtype)."""

    def __init__(self, device: str) -> None:
        self.device, self.dtype = torch.device(device), torch.bfloat16


def median_ms(fn, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up: the first call sets up kernels and workspaces
    times, out = [], None
    for _ in range(repeats):
        begin = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times), out


def measure(processor: Any, rows: list[dict], args: argparse.Namespace) -> dict:
    """One (family, size, clips) row: ms per clip of each part (module docstring)."""
    items = [(row, "Describe this video in detail.") for row in rows]
    table = pa.Table.from_pylist(rows)
    result: dict[str, Any] = {"rows_ms": median_ms(table.to_pylist, args.repeats)[0] / len(rows)}
    target = Target(args.device or "cpu")
    for threads in args.threads:
        torch.set_num_threads(threads)
        ms, _ = median_ms(lambda: timed_inputs(target, lambda: build_inputs(processor, items)), args.repeats)
        result[f"cpu_{threads}t_ms"] = ms / len(rows)
    on_cpu = build_inputs(processor, items)
    name = next(k for k in on_cpu if k.startswith("pixel_values"))
    result["pixel_values_shape"] = list(on_cpu[name].shape)
    if args.device:
        ms, _ = median_ms(lambda: timed_inputs(target, lambda: build_inputs(processor, items, None, target.device)),
                          args.repeats)
        on_device = build_inputs(processor, items, None, target.device)[name].cpu()
        levels = float((on_device.double() - on_cpu[name].double()).abs().max()) / one_level(processor)
        result.update(device_ms=ms / len(rows), levels=levels)
    return result


def markdown(report: dict) -> str:
    threads, device, gpu = report["threads"], report["device"], report["gpu"]
    cpu_columns = " | ".join(f"CPU {t} thread{'s' if t > 1 else ''} ms" for t in threads)
    lines = [f"# Building a model call's inputs, per clip ({report['hardware']})", "",
             f"`workers.model_inputs.build_inputs` with each family's real processor at the checkpoints' sizes, "
             f"{report['frames']} frames per clip (seeded noise), median of {report['repeats']}; rows: the actor's Arrow "
             "batch to Python rows. Levels: the largest pixel difference of the device's inputs from the CPU's, in "
             "levels of the 8-bit frames." + (f" Model GPU time per clip for scale: {gpu['ms_per_clip']:.1f} ms "
                                              f"({gpu['what']})." if gpu else ""), "",
             f"| family | frame size | clips per call | rows ms | {cpu_columns} |"
             + (f" {device} ms | levels |" if device else "") + (" CPU 1 thread / GPU model time |" if gpu and 1 in threads else ""),
             "|---|---|---|---|" + "---|" * len(threads) + ("---|---|" if device else "") + ("---|" if gpu and 1 in threads else "")]
    for r in report["rows"]:
        cells = [r["family"], r["size"], str(r["clips"]), f"{r['rows_ms']:.1f}", *(f"{r[f'cpu_{t}t_ms']:.1f}" for t in threads)]
        if device:
            cells += [f"{r['device_ms']:.2f}", f"{r['levels']:.2f}"]
        if gpu and 1 in threads:
            cells.append(f"{r['cpu_1t_ms'] / gpu['ms_per_clip']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    machine = hardware(args.device or "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for family in args.families:
            processor = real_size_processor(family, Path(cache))
            for size in args.sizes:
                width, height = (int(n) for n in size.split("x"))
                for clips in args.clips:
                    row = {"family": family, "size": f"{width}x{height}", "clips": clips,
                           **measure(processor, [noise_clip_row(args.frames, height, width, seed) for seed in range(clips)], args)}
                    print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
                    rows.append(row)
    gpu = gpu_ms_per_clip()
    report = {"hardware": machine, "args": {k: str(v) for k, v in vars(args).items()}, "frames": args.frames,
              "repeats": args.repeats, "threads": args.threads, "device": args.device,
              "gpu": gpu and {"ms_per_clip": gpu[0], "what": gpu[1]}, "rows": rows}
    stem = "inputs-" + (args.device.split(":")[0] if args.device and args.device != "cpu" else "cpu")
    report_file.write(args.out_dir / stem, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
