"""CPU cost of a clip's frames, per decoder and source resolution, and the decode CPUs one GPU needs.

    python -m bench.bench_decode                 # about 3 minutes on 2 cores
    python -m bench.bench_decode --sizes 480x270 640x360 --seconds 4 --repeats 1    # the suite's toy run

A GPU that waits for frames is paid for all the same, so the model's speed per clip only counts
if the CPU decode tasks keep up. Per source and decoder this times what a decode task runs:
`pipeline.video.decode_clip` through the decoder process, with the default decode settings
(`DecodeConfig`: 16 frames, at most 448x448 pixels each) over each `ClipsConfig().clip_len_s`
clip of the file, the median over clips and repeats, for each of SETUPS: PyAV on one thread (the
default: `decoder='auto'` tries PyAV first, on `decode.num_cpus` threads), decord on one thread,
and decord on a thread per core (the default before 2026-12-01); and PyAV on one thread with
`decode.reference_frames_only`. Beside it, the part of that spent shrinking
the 16 frames to 448x448 (`frame_sampling.shrink`, timed alone on the same full-size frames),
and the same shrink by PIL's antialiased bilinear resize, the pipeline's before torch's kernel.

Sources: the real sample `nasa_13013.mp4` (480x270) when `--sizes` asks for it, else H.264 files
made here at each size (a moving texture, x264 `superfast`: CABAC, B-frames, a keyframe every
250 frames; 30 fps, `--seconds` long; 3.7 Mbit/s at 720p and 6.4 at 1080p, the bitrates of web
video). Real footage differs with bitrate and codec.

Each clip is timed twice: wall time, and CPU time (user + system of this process, which asks for
the frames and unpickles them, and of the decoder process, whose decoders may run several
threads; Linux /proc). "Decode CPUs per GPU" divides a clip's CPU time by the GPU time one clip
takes in the model, from the whole-model benchmark's H200 run (`bench/results/model-cuda-7b.json`,
its fastest V²Drop row at the longest new-token count): the CPUs that keep that GPU busy. Writes
bench/results/decode-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import report as report_file
from bench.bench_v2drop import hardware
from bench.report import RESULTS_DIR, gpu_ms_per_clip
from pipeline.clips import plan_clips
from pipeline.config import ClipsConfig, DecodeConfig
from pipeline.decoder_process import DecoderProcess
from pipeline.frame_sampling import fit_to_max_pixels, shrink
from pipeline.video import decode_clip, probe

REPO = Path(__file__).resolve().parents[1]
REAL_SAMPLE = {"480x270": REPO.parent / "shared" / "videos" / "nasa_13013.mp4"}
# (decoder, threads, reference frames only): the default now (`decoder='auto'` tries PyAV first, on
# decode.num_cpus = 1 thread); the same with decode.reference_frames_only; decord on one thread; and
# the default before 2026-12-01, decord first on a thread per core
SETUPS = (("pyav", 1, False), ("pyav", 1, True), ("decord", 1, False), ("decord", os.cpu_count() or 1, False))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["480x270", "1280x720", "1920x1080"], help="WIDTHxHEIGHT")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the files made here")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def make_video(path: Path, width: int, height: int, seconds: float, fps: int = 30) -> Path:
    """An H.264 file of a texture moving a few pixels per frame (motion, detail, no scene cuts)."""
    import av

    rng = np.random.default_rng(0)
    cells = rng.integers(0, 256, ((height + 512) // 8, (width + 512) // 8, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(cells, 8, 0), 8, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "superfast", "crf": "26"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            y, x = (2 * i) % 512, (3 * i) % 512
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[y:y + height, x:x + width]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    print(f"made {path.name}: {path.stat().st_size * 8 / seconds / 1e6:.1f} Mbit/s", flush=True)
    return path


def pil_shrink(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference: PIL's bilinear resize, antialiased when shrinking."""
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR))


def measure(path: Path, setup: tuple[str, int, bool], repeats: int, process: DecoderProcess) -> dict:
    """One table row: the medians of `time_clip` over every clip of `path`, `repeats` times."""
    info, clips = probe(str(path), process=process), ClipsConfig()
    spans = [(c.start_s, c.end_s) for c in plan_clips(str(path), info.duration_s, clip_len_s=clips.clip_len_s,
                                                        stride_s=clips.stride_s, min_clip_len_s=clips.min_clip_len_s)]
    timings = [time_clip(path, span, setup, process) for _ in range(repeats) for span in spans]
    frames = timings[-1].pop("frames")
    medians = {key: statistics.median(t[key] for t in timings if t[key] is not None)
               for key in ("clip_ms", "clip_cpu_ms", "shrink_ms", "shrink_pil_ms")}
    decoder, threads, reference_only = setup
    return {"source": f"{info.width}x{info.height}", "file": path.name, "codec": info.codec, "decoder": decoder,
            "threads": threads, "reference_frames_only": reference_only, "clips": len(spans), "frames": int(frames.shape[0]),
            "frame_size": f"{frames.shape[2]}x{frames.shape[1]}", **medians}


def time_clip(path: Path, span: tuple[float, float], setup: tuple[str, int, bool], process: DecoderProcess) -> dict:
    """One clip: wall and CPU ms of its decode task's call; then, on the same frames decoded at full
    size, the ms of `shrink` and of PIL's resize (0 where nothing is shrunk)."""
    decode, (decoder, threads, reference_only) = DecodeConfig(), setup

    def call(max_pixels: int) -> np.ndarray:
        return decode_clip(str(path), *span, num_frames=decode.num_frames, max_pixels=max_pixels, decoder=decoder,
                           threads=threads, reference_frames_only=reference_only, process=process).frames

    pid, begin, cpu_before = process.pid, time.perf_counter(), task_cpu_ms(process)
    frames = call(decode.max_pixels)
    out = {"frames": frames, "clip_ms": (time.perf_counter() - begin) * 1e3,
           "clip_cpu_ms": task_cpu_ms(process) - cpu_before if process.pid == pid else None,  # None: restarted
           "shrink_ms": 0.0, "shrink_pil_ms": 0.0}
    full = call(10**9)
    height, width = fit_to_max_pixels(full.shape[1], full.shape[2], decode.max_pixels)
    if (height, width) == full.shape[1:3]:
        return out
    for key, fn in (("shrink_ms", shrink), ("shrink_pil_ms", pil_shrink)):
        begin = time.perf_counter()
        shrunk = np.stack([fn(frame, height, width) for frame in full])
        out[key] = (time.perf_counter() - begin) * 1e3
        if fn is shrink:  # what was timed alone is what the decode task ran
            assert np.array_equal(shrunk, frames), f"{path.name} {decoder}: shrink differs from the decoded frames"
    return out


def task_cpu_ms(process: DecoderProcess) -> float:
    """CPU time so far (user + system, ms) of what a decode task is: this process, which asks and
    unpickles the frames, plus its decoder process, which decodes on as many threads as the
    decoder takes (Linux: /proc). A clip's CPU time, not its wall time, says how many CPUs a
    stream of clips needs."""
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3, state
    child_ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return child_ticks * 1e3 / os.sysconf("SC_CLK_TCK") + time.process_time() * 1e3


def markdown(report: dict) -> str:
    gpu = report["gpu"]
    lines = [f"# Decode cost per clip ({report['hardware']})", "",
             f"`pipeline.video.decode_clip` through the decoder process, default decode settings ({report['num_frames']} "
             f"frames of at most {report['max_pixels']} pixels per {report['clip_len_s']:g} s clip); median over "
             f"every clip of each file x {report['repeats']} repeats. Clip ms: wall time; clip CPU ms: user + system "
             "time of the asking process and the decoder process, whose decoders may use several threads. Shrink: the 16 frames from their full size, "
             "`frame_sampling.shrink` (torch, one thread, as in the decoder process) vs PIL's bilinear (the pipeline's "
             "resize before; 0 where the frames are small enough already); the clip with PIL's shrink is "
             "clip - shrink + PIL's, from the same run. The pipeline's default: PyAV on 1 thread; before 2026-12-01: "
             f"decord on a thread per core ({SETUPS[-1][1]} here) with PIL's shrink.", "",
             "| source | file | decoder | threads | reference frames only | clips | clip ms | clip CPU ms | of it shrink ms | "
             "shrink by PIL ms | clip CPU ms with PIL's shrink |" + (" decode CPUs per GPU |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in report["rows"]:
        with_pil = r["clip_cpu_ms"] - r["shrink_ms"] + r["shrink_pil_ms"]
        lines.append(f"| {r['source']} | {r['file']} | {r['decoder']} | {r['threads']} | "
                     f"{'yes' if r['reference_frames_only'] else 'no'} | {r['clips']} | {r['clip_ms']:.0f} | "
                     f"{r['clip_cpu_ms']:.0f} | {r['shrink_ms']:.1f} | {r['shrink_pil_ms']:.1f} | "
                     f"{with_pil:.0f} ({with_pil / r['clip_cpu_ms']:.2f}x) |"
                     + (f" {r['clip_cpu_ms'] / gpu['ms_per_clip']:.1f} |" if gpu else ""))
    if gpu:
        lines += ["", f"Decode CPUs per GPU: clip CPU ms / {gpu['ms_per_clip']:.1f} ms of GPU per clip ({gpu['what']}): "
                  "the CPUs of CPUs like this one that keep that GPU busy."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    decode, clips = DecodeConfig(), ClipsConfig()
    machine = hardware("cpu")  # before the one thread below
    torch.set_num_threads(1)  # as in the decoder process (`_serve_fd`), for the shrinks timed here
    shrink(np.zeros((64, 64, 3), np.uint8), 32, 32)  # torch's first call sets up; a decode task pays it once
    process = DecoderProcess()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            width, height = (int(n) for n in size.split("x"))
            path = REAL_SAMPLE.get(size) or make_video(Path(scratch) / f"synthetic_{size}.mp4", width, height, args.seconds)
            for setup in SETUPS:
                rows.append(measure(path, setup, args.repeats, process))
                print(f"{size} {setup}: {rows[-1]['clip_cpu_ms']:.0f} ms CPU per clip", flush=True)
    process.close()
    gpu = gpu_ms_per_clip()
    report = {"hardware": machine, "args": {k: str(v) for k, v in vars(args).items()}, "repeats": args.repeats,
              "num_frames": decode.num_frames, "max_pixels": decode.max_pixels, "clip_len_s": clips.clip_len_s,
              "gpu": gpu and {"ms_per_clip": gpu[0], "what": gpu[1]}, "rows": rows}
    report_file.write(args.out_dir / "decode-cpu", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
