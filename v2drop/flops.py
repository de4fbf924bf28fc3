"""Analytic FLOPs of the language-model prefill (multiply-add = 2 FLOPs).

Per decoder layer processing n new tokens after c cached ones (a prefill has c = 0):
    projections  2 n D (H hd + 2 Hkv hd + H hd)      q, k, v, o
    mlp          2 n 3 D I                            gate, up, down (SwiGLU)
    attention    2 * 2 H hd n (c + (n + 1) / 2)       QK^T and AV over the cache and the causal triangle
The vision encoder and the lm head are left out: V²Drop changes neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TextShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int

    @classmethod
    def from_config(cls, text_config) -> TextShape:
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            hidden_size=text_config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=text_config.intermediate_size,
            num_layers=text_config.num_hidden_layers,
        )


def layer_prefill_flops(shape: TextShape, num_tokens: int, num_cached: int = 0) -> float:
    n, d, hd = float(num_tokens), shape.hidden_size, shape.head_dim
    projections = 2 * n * d * hd * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    mlp = 2 * n * 3 * d * shape.intermediate_size
    attention = 2 * 2 * shape.num_heads * hd * n * (num_cached + (n + 1) / 2)
    return projections + mlp + attention


def prefill_flops(shape: TextShape, tokens_per_layer: Sequence[int]) -> float:
    """Sum over layers; tokens_per_layer[l] is every token (text + visual) layer l processes."""
    if len(tokens_per_layer) != shape.num_layers:
        raise ValueError(f"need {shape.num_layers} per-layer counts, got {len(tokens_per_layer)}")
    return sum(layer_prefill_flops(shape, n) for n in tokens_per_layer)


def continuation_flops(shape: TextShape, num_tokens: int, cached_per_layer: Sequence[int]) -> float:
    """`num_tokens` new tokens on a filled cache; cached_per_layer[l] is what layer l holds (after
    V²Drop, fewer in later layers). Example: a question after a shared video prefill."""
    if len(cached_per_layer) != shape.num_layers:
        raise ValueError(f"need {shape.num_layers} per-layer counts, got {len(cached_per_layer)}")
    return sum(layer_prefill_flops(shape, num_tokens, cached) for cached in cached_per_layer)
