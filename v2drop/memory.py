"""Device bytes one clip needs in a model call: the one memory model the model stage sizes its
calls with, from the model's shape, the dtype and the V²Drop schedule.

Per clip, for a prompt of `text` + `visual` tokens, `patches` vision-tower patches and `new`
generated tokens, on one decode engine, the largest of its phases:

    kv       = sum over layers of (text + visual kept at that layer + new) * 2 * kv_heads * head_dim * bytes
    prefill  = (text + visual) * (mlp * intermediate + 6 * hidden) * bytes   one layer's activations
    vision   = patches * (3 * vision_intermediate + 6 * vision_hidden) * bytes
    engine   = max(vision, prefill + kv, copies * kv)
    clip     = the larger of the engine's and generate()'s (a failed static call is decoded again)

The vision tower runs before any cache exists; the prefill's last layers hold their activations
beside the nearly filled cache; the static engine copies that cache into its own after the
prefill, when its activations are freed, so its two copies are a phase of their own. ENGINES gives
`mlp`, the [tokens, intermediate] tensors an MLP holds at its peak (the static engine's MLP
computes in place in the gate's half of one gate/up product, v2drop.fused_projections: 2;
transformers' holds gate, up and act(gate) * up: 3; a static engine holds 3 where gate and up are
not plain Linear layers and 4 where the in-place probe fails, which an out-of-memory error then
catches), and the `copies` of the cache. Measured on an H200 (bench/results/model-cuda-7b.json, Qwen2.5-VL-7B shapes,
bf16, 2,048 visual and 49 text tokens, 256 new; the slope of peak memory from batch 16 to 64),
with the engines of then (transformers' MLP: `static-unfused` and `dynamic`) while the benchmark
held one more prefill's cache: 569 MiB per clip stock and 383 with V²Drop at 25 %, the same for
both engines (their prefill phase is the peak), against 557 and 389 modelled, cache included
(tests/v2drop/test_memory.py: within 3 %; the budget leaves 10 % of the free memory unused).
Today's static engine: 442 and 358, generate()'s need (its own 366 and 282); not yet measured.
The weights are not in it: the budget is the memory free after loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2drop.schedule import Schedule

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
# decode engine -> (MLP tensors of the intermediate width at its peak, copies of the KV cache)
ENGINES = {"static": (2, 2), "static-unfused": (3, 2), "dynamic": (3, 1)}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vision_hidden: int
    vision_intermediate: int
    dtype_bytes: int

    @classmethod
    def from_config(cls, config, dtype: torch.dtype) -> ModelShape:
        """From a vision-language model's config (text_config and vision_config inside)."""
        text, vision = config.get_text_config(), config.vision_config
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vision_hidden=getattr(vision, "hidden_size", None) or vision.embed_dim,
            vision_intermediate=vision.intermediate_size,
            dtype_bytes=DTYPE_BYTES[dtype],
        )


def kv_bytes(shape: ModelShape, schedule: Schedule | None, text: int, visual: int, new: int) -> int:
    """One clip's KV cache: every layer's text, kept visual and new tokens; schedule None = stock."""
    kept = schedule.tokens_per_layer(visual, shape.num_layers) if schedule else [visual] * shape.num_layers
    cached = sum(kept) + (text + new) * shape.num_layers
    return cached * 2 * shape.kv_heads * shape.head_dim * shape.dtype_bytes


def engine_bytes(shape: ModelShape, schedule: Schedule | None, text: int, visual: int, patches: int, new: int,
                 engine: str) -> int:
    """Device bytes of one clip in a call on `engine` (ENGINES) alone: its largest phase."""
    mlp, copies = ENGINES[engine]
    kv = kv_bytes(shape, schedule, text, visual, new)
    prefill = (text + visual) * (mlp * shape.intermediate + 6 * shape.hidden) * shape.dtype_bytes
    vision = patches * (3 * shape.vision_intermediate + 6 * shape.vision_hidden) * shape.dtype_bytes
    return max(vision, prefill + kv, copies * kv)


def clip_bytes(shape: ModelShape, schedule: Schedule | None, text: int, visual: int, patches: int, new: int,
               engine: str = "static") -> int:
    """Device bytes of one clip in a call on `engine` or, should it fail, on generate() (see the
    module docstring); schedule None = stock."""
    return max(engine_bytes(shape, schedule, text, visual, patches, new, name) for name in (engine, "dynamic"))


def clips_per_call(budget_bytes: int, per_clip_bytes: int, most: int) -> int:
    """How many such clips fit the budget: at least 1 (an OOM then splits the call), at most `most`."""
    return max(1, min(most, budget_bytes // max(per_clip_bytes, 1)))
