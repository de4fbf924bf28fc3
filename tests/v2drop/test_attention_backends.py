"""The engine under another attention kernel in half precision: flash_attention_2 on CUDA.

Each check runs twice. On CPU with eager attention it always runs, which proves the check itself.
On CUDA with flash_attention_2 it is marked `gpu` and skipped without CUDA and the flash-attn
package: `python -m pytest -m gpu tests/v2drop` on a GPU machine.

float16 because flash-attention takes only half types, and float16 keeps three more mantissa bits
than bfloat16, so kernel rounding stays well inside the tolerances while a wrong mask does not.
The reference is the same weights under sdpa on the same device: one model, switched kernel.
"""

from __future__ import annotations

import pytest
import torch

import v2drop
from tests.v2drop import models
from tests.v2drop.models import Sample, Visual
from tests.v2drop.test_engine import DROP, FAMILIES, IDENTITY, generate, video

NEEDS_FLASH_ATTENTION = "needs a CUDA GPU and the flash-attn package (pip install '.[gpu]')"
# Measured on CPU in float16: eager vs sdpa differ by <= 6e-4, while attending over another set of
# tokens (a different kept set) moves the logits by 0.05 to 0.3 (logits std 0.16).
LOGITS_ATOL = 5e-3


def flash_attention_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


BACKENDS = [
    pytest.param("cpu", "eager", id="cpu-eager"),
    pytest.param("cuda", "flash_attention_2", id="cuda-flash_attention_2",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not flash_attention_available(), reason=NEEDS_FLASH_ATTENTION)]),
]


def half_model(family: str, device: str, attn: str):
    return models.model(family, attn=attn, dtype=torch.float16).to(device)


def use_kernel(model, attn: str) -> None:
    """Attention modules read the kernel from the config at call time."""
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config._attn_implementation = attn


def on(device: str, inputs: dict) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


@pytest.mark.parametrize("device, attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_all_keeps_one_is_the_stock_model_in_float16(device, attn, family):
    model = half_model(family, device, attn)
    samples = [Sample("What happens in this clip?", video(family, 0)), Sample("Describe it.", video(family, 0))]
    inputs = on(device, models.batch(family, samples))
    stock_tokens, stock_logits = generate(model, inputs, max_new_tokens=4)
    v2drop.enable(model, IDENTITY)
    tokens, logits = generate(model, inputs, max_new_tokens=4)
    assert torch.equal(tokens, stock_tokens)
    torch.testing.assert_close(logits.float(), stock_logits.float(), rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("device, attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_lone_sample_with_drops_agrees_with_sdpa(device, attn, family):
    """A batch of one after drops: its positions have gaps, which flash-attention would read as
    packed sequences if the layers saw them. The kept tokens and the answer must match sdpa's."""
    model = half_model(family, device, attn)
    v2drop.enable(model, DROP)
    inputs = on(device, models.batch(family, [Sample("What happens in this clip?", video(family, 1))]))
    tokens, logits = generate(model, inputs, max_new_tokens=4)
    kept = v2drop.last_stats(model)[0]["kept_visual_positions_per_stage"]
    use_kernel(model, "sdpa")
    sdpa_tokens, sdpa_logits = generate(model, inputs, max_new_tokens=4)
    assert v2drop.last_stats(model)[0]["kept_visual_positions_per_stage"] == kept
    assert torch.equal(tokens, sdpa_tokens)
    torch.testing.assert_close(logits.float(), sdpa_logits.float(), rtol=0, atol=LOGITS_ATOL)
