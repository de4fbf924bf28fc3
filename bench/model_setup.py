"""The whole-model benchmark's model, its clips and the two decode engines (set-up, no timing).

A Qwen2.5-VL with random weights and the real architecture, `--seven-b` giving Qwen2.5-VL-7B's
shapes; each clip is one video of `--grid` patches and the same prompt, so a batch has no padding.
Needs only torch, transformers and this repository (the GPU box runs it without Ray or pyarrow).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import v2drop
from bench.bench_v2drop import SEVEN_B, kv_cache_bytes
from v2drop import static_decode
from v2drop.compat import output_cache
from vlm import tiny

VARIANTS = ("stock", "v2drop")
ENGINES = ("dynamic", "static")  # the default run (under 8 minutes on one H200)
# compiled: the static step through torch.compile (compiles once per batch size); static-unfused: the
# static engine with transformers' RMSNorm, rotary and projections (v2drop.kernels), side by side
ENGINE_CHOICES = (*ENGINES, "compiled", "static-unfused")
# generate_static's keywords for each engine but `dynamic`
STEP_KWARGS: dict[str, dict] = {"static": {}, "compiled": {"compile": True}, "static-unfused": {"fused_kernels": False}}
# Qwen2.5-VL-7B's vision tower (config.json of Qwen/Qwen2.5-VL-7B-Instruct)
SEVEN_B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      fullatt_block_indexes=[7, 15, 23, 31])
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch²
# Qwen2.5-VL-7B-Instruct's generation_config.json: generate() and the static steps apply it (v2drop.greedy),
# so the timed steps and the counted ones hold its kernels, as the model stage's do
REPETITION_PENALTY = 1.05


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
    model.generation_config.repetition_penalty = REPETITION_PENALTY
    v2drop.fused_projections.install(model)  # as the model stage does at load, before any budget is read
    return model, tokenizer


def engine_arg(text: str) -> str:
    """argparse type of --engines: an engine of ENGINE_CHOICES, or ENGINE@BATCH for one that runs
    only at that fixed batch size (a side-by-side comparison at one batch, where running it at every
    batch would cost minutes more: a compile per batch size, or only a second opinion)."""
    name, at, batch = text.partition("@")
    if name not in ENGINE_CHOICES:
        raise argparse.ArgumentTypeError(f"unknown engine {name!r} in {text!r}; choose from {', '.join(ENGINE_CHOICES)}")
    if at and not (batch.isdigit() and int(batch) >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: the batch after '@' must be a positive integer")
    return text


def parse_engine(spec: str) -> tuple[str, int | None]:
    """An --engines entry (checked by engine_arg) -> (engine, the one batch size it is limited to,
    else None)."""
    name, at, batch = spec.partition("@")
    return name, int(batch) if at else None


def engines_at(specs, batch: int | None) -> list[str]:
    """The engines of --engines that run at a fixed `batch` (None: an engine-chosen batch, where
    only the engines run at every batch do)."""
    return [name for name, only in map(parse_engine, specs) if only in (None, batch)]


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


def set_variant(model, variant: str, schedule, prefill_graphs=None) -> None:
    """Stock or V²Drop. With `prefill_graphs` (v2drop.prefill_graphs) small prefills are replayed
    from recordings; for stock through v2drop's patched forward with an empty schedule, which runs
    transformers' own forward."""
    if prefill_graphs is not None:
        dropping = schedule if variant == "v2drop" else v2drop.Schedule(layers=(), keep=())
        v2drop.enable(model, dropping, prefill_graphs=prefill_graphs)
    elif variant == "stock":
        v2drop.disable(model)
    else:
        v2drop.enable(model, schedule)


@torch.no_grad()
def encode(model, clips: dict):
    return model.model.get_video_features(clips["pixels"], clips["video_grid_thw"], return_dict=True)


@torch.no_grad()
def run_generate(model, inputs: dict, new_tokens: int, engine: str, args):
    """Exactly `new_tokens` greedy steps per row (the static engine checks for finished rows only
    at the end, as generate's min_new_tokens keeps every row going); returns (KV-cache bytes or
    None, the new tokens [B, new_tokens], ms from the call to the first token's logits: the
    engine's own prefill, fused kernels and generate()'s setup included)."""
    started, first = mark(args.device), FirstLogits(args.device)
    timer = {"logits_processor": LogitsProcessorList([first])}
    if engine == "dynamic":
        out = model.generate(**fresh(inputs), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True, **timer)
        kv_bytes, tokens = kv_cache_bytes(output_cache(out)), out.sequences[:, -new_tokens:]
    else:
        kv_bytes, tokens = None, static_decode.generate_static(
            model, fresh(inputs), new_tokens, capture=args.capture, stop_check_every=new_tokens,
            **STEP_KWARGS[engine], **timer)
    return kv_bytes, tokens, ms_between(started, first.at)


Mark = torch.cuda.Event | float


def mark(device: str) -> Mark:
    """A point in time: a CUDA event recorded on the current stream (no sync), else the clock."""
    if not device.startswith("cuda"):
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def ms_between(start: Mark, end: Mark | None) -> float:
    """Milliseconds between two marks (waits for a CUDA event's work to be done)."""
    assert end is not None, "no logits were processed"
    if isinstance(start, torch.cuda.Event):
        end.synchronize()
        return start.elapsed_time(end)
    return (end - start) * 1e3


class FirstLogits(LogitsProcessor):
    """Marks when the first token's logits exist, i.e. when the engine's prefill has finished
    (generate() calls its logits processors once per token; the static engine's prefill is one)."""

    observes_only = True  # returns the scores unchanged: the static engine may run it (v2drop.greedy)

    def __init__(self, device: str) -> None:
        self.device, self.at = device, None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            self.at = mark(self.device)
        return scores
