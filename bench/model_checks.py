"""The whole-model benchmark's one-off measurements beside its table: capture check, vision loop
vs batched, prefill FLOP ratio, aten calls and syncs of a decode step and of a prefill, kernel
profiles of a decode step and of a batch-1 prefill, eager and replayed from a CUDA graph."""

from __future__ import annotations

import statistics

import torch
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode

import v2drop
from bench.model_setup import (
    STEP_KWARGS,
    VARIANTS,
    clip_batch,
    encode,
    engines_at,
    fresh,
    parse_engine,
    run_generate,
    set_variant,
    text_inputs,
)
from bench.op_counts import decode_step_counts, prefill_counts, static_prefill_counts, static_step_counts
from bench.report import timed
from v2drop import static_decode, vision
from v2drop.prefill_graphs import PrefillGraphs

NOT_KERNELS = frozenset({"Command Buffer Full"})  # a CUDA runtime stall the profiler lists among device events


def check_capture(model, tokenizer, args, schedule) -> str | None:
    """The captured static step (and the captured compiled or unfused one, when that engine runs)
    must give the same step's uncaptured tokens. Checked at batch 2, or at the one batch an
    ENGINE@BATCH runs at (a compiled step compiles once per batch size, so that is the compile its
    timed rows reuse). An extra engine that fails (a compile error, other tokens) leaves the run,
    which goes on with the others; if `static` fails, the run goes on uncaptured. Returns why."""
    checked = [(name, only or 2) for name, only in map(parse_engine, args.engines) if name in STEP_KWARGS]
    if not args.capture or not checked:
        return None
    failed: dict[str, str] = {}
    for batch in sorted({b for _, b in checked}):
        clips = clip_batch(model, tokenizer, args.grid, batch, args.device)
        inputs = text_inputs(clips, encode(model, clips))
        for variant in VARIANTS:
            set_variant(model, variant, schedule)
            for engine in (e for e, b in checked if b == batch and e not in failed):
                try:  # captured vs uncaptured, the same step function
                    eager, captured = (static_decode.generate_static(model, fresh(inputs), 8, capture=capture,
                                                                     stop_check_every=8, **STEP_KWARGS[engine])
                                       for capture in (False, True))
                    if not torch.equal(eager, captured):
                        raise RuntimeError(f"{variant} batch {batch}: captured tokens "
                                           f"{captured.tolist()} != uncaptured {eager.tolist()}")
                except Exception as error:  # noqa: BLE001 - the run goes on without it and the report says why
                    failed[engine] = f"{engine}: {type(error).__name__}: {str(error)[:300]}"
    if "static" in failed:
        args.capture = False
    args.engines = [e for e in args.engines if parse_engine(e)[0] == "static" or parse_engine(e)[0] not in failed]
    return "; ".join(failed.values()) or None


def vision_loop_vs_batched(model, tokenizer, args) -> dict:
    """The vision tower at batch 1, ms per clip: stock (per-window loop), v2drop.vision's batched
    sdpa calls with transformers' norms and rotary, and with its fused norms and fewer-pass rotary
    (installed last, as it stays).
    Beside them, what the batched tower computes: its FLOPs per clip (torch's FLOP counter: matrix
    products and attention) and the rate it reaches, and on CUDA its top kernels: the tower is the
    largest fixed cost of a V²Drop clip, and these say whether its time goes to arithmetic."""
    clips = clip_batch(model, tokenizer, args.grid, 1, args.device)
    times = {}
    for name, switch in (("stock_loop", vision.uninstall),
                         ("batched_unfused", lambda m: vision.install(m, fused=False)),
                         ("batched", vision.install)):
        switch(model)
        encode(model, clips)  # warm-up
        times[f"{name}_ms"] = statistics.median(timed(lambda: encode(model, clips), args.device)[0]
                                                for _ in range(max(args.repeats, 1)))
    with FlopCounterMode(display=False) as flops:
        encode(model, clips)
    times["flops_per_clip"] = flops.get_total_flops()
    times["batched_tflop_per_s"] = times["flops_per_clip"] / times["batched_ms"] / 1e9
    if args.device.startswith("cuda"):
        kernels = kernel_ms(lambda: encode(model, clips))
        times["top"] = [(k[:70], round(ms, 3), n) for k, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:8]]
    return times


def prefill_flop_ratio(model, tokenizer, args, schedule) -> float:
    set_variant(model, "v2drop", schedule)
    clips = clip_batch(model, tokenizer, args.grid, 1, args.device)
    with torch.no_grad():
        model(**fresh(text_inputs(clips, encode(model, clips))), use_cache=True, logits_to_keep=1)
    stats = v2drop.last_stats(model)[0]
    return stats["prefill_flops"] / stats["prefill_flops_full"]


def step_counts(model, tokenizer, args, schedule) -> tuple[dict, dict, dict, dict]:
    """Aten calls, kernel calls and host-device syncs per variant at batch 1: (one decode step of
    generate(), one step of the static engine, one prefill of transformers' model, the static
    engine's prefill)."""
    clips = clip_batch(model, tokenizer, args.grid, 1, args.device)
    inputs = text_inputs(clips, encode(model, clips))
    decode, static, prefill, static_prefill = {}, {}, {}, {}
    for variant in VARIANTS:
        set_variant(model, variant, schedule)
        decode[variant] = decode_step_counts(model, inputs).as_dict()
        static[variant] = static_step_counts(model, inputs).as_dict()
        prefill[variant] = prefill_counts(model, inputs).as_dict()
        static_prefill[variant] = static_prefill_counts(model, inputs).as_dict()
    return decode, static, prefill, static_prefill


def kernel_ms(fn) -> dict[str, tuple[float, int]]:
    """GPU kernel time (ms) and launches per kernel name while `fn` runs (CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # device events only: the aten operators that launched them carry the same time again
    return {e.key: (e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0 and e.key not in NOT_KERNELS}


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
        for engine in engines_at(args.engines, batch):
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


@torch.no_grad()
def prefill_profile(model, tokenizer, args, schedule) -> dict:
    """Where a batch-1 prefill's time goes, per variant, eager and `replayed` (v2drop.prefill_graphs:
    recorded once as a CUDA graph, then replayed; stock through the same patched forward with an
    empty schedule, i.e. transformers' own forward): wall ms, and on CUDA the GPU kernel ms. At
    batch 1 a dropped stage's layers are small, so eager wall well above kernel time means the host
    sets the pace, and the prefill time ratio stays above the FLOP ratio; replayed, the host is out.
    Off CUDA nothing is recorded (`replays` 0) and both modes are eager."""
    clips = clip_batch(model, tokenizer, args.grid, 1, args.device)
    inputs = text_inputs(clips, encode(model, clips))
    out = {}
    for variant in VARIANTS:
        for mode in ("eager", "replayed"):
            graphs = PrefillGraphs() if mode == "replayed" else None
            try:
                set_variant(model, variant, schedule, prefill_graphs=graphs)

                def prefill() -> object:
                    return model(**fresh(inputs), use_cache=True, logits_to_keep=1)

                prefill(), prefill()  # warm-up; a replayed mode records at the first call
                entry: dict = {"wall_ms": statistics.median(timed(prefill, args.device)[0] for _ in range(3))}
                if args.device.startswith("cuda"):
                    kernels = kernel_ms(prefill)
                    entry.update(kernel_ms=sum(ms for ms, _ in kernels.values()),
                                 launches=sum(n for _, n in kernels.values()),
                                 top=[(k[:70], round(ms, 3), n) for k, (ms, n) in
                                      sorted(kernels.items(), key=lambda kv: -kv[1][0])[:6]])
                if graphs is not None:
                    entry.update(replays=graphs.replays, failures=list(graphs.failures.values()))
            except Exception as error:  # noqa: BLE001 - a profile is a diagnostic; the run goes on
                entry = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            out[f"{variant}/{mode}"] = entry
    set_variant(model, "stock", schedule)
    return out
