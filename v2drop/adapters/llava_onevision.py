"""LLaVA-OneVision: a Qwen2 decoder with 1-D RoPE.

Its visual spans include the newline embeddings that the processor counts as image/video
placeholder tokens, so the placeholder ids cover them: newlines are scored and dropped like
any other visual token.
"""

from __future__ import annotations

from v2drop.adapters.base import FamilyAdapter, default_positions

LLAVA_ONEVISION = FamilyAdapter(
    name="LLaVA-OneVision",
    model_types=("llava_onevision",),
    positions=default_positions,
)
