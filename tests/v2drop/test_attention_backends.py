"""The engine under flash_attention_2, and in half precision.

Each check runs on three backends:
* cpu-eager: always runs, and proves the check itself;
* cpu-flash_attention_2-reference-kernel: transformers' whole flash_attention_2 path (2-D flash
  masks, unpadding, the packed-sequence check, cu_seqlens) on a CPU, with only the CUDA kernel
  replaced by the plain-torch one in `flash_reference.py`;
* cuda-flash_attention_2: the real kernel, marked `gpu` and skipped without CUDA and the
  flash-attn package: `python -m pytest -m gpu tests/v2drop` on a GPU machine.

float16 because flash-attention takes only half types, and float16 keeps three more mantissa bits
than bfloat16, so kernel rounding stays well inside the tolerances while a wrong mask does not.
The reference is the same weights under sdpa on the same device: one model, switched kernel.
"""

from __future__ import annotations

import pytest
import torch

import v2drop
from tests.v2drop import flash_reference
from tests.v2drop.test_engine import DROP, FAMILIES, IDENTITY, generate, mixed_samples, video
from vlm import testing as models
from vlm.testing import Sample

NEEDS_FLASH_ATTENTION = "needs a CUDA GPU and the flash-attn package (pip install '.[gpu]')"
# Measured on CPU in float16: eager vs sdpa differ by <= 6e-4, while attending over another set of
# tokens (a different kept set) moves the logits by 0.05 to 0.3 (logits std 0.16).
LOGITS_ATOL = 5e-3
REFERENCE_KERNEL = "flash_attention_2-reference-kernel"


def flash_attention_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return torch.cuda.is_available() and is_flash_attn_2_available()


@pytest.fixture(params=[
    pytest.param(("cpu", "eager"), id="cpu-eager"),
    pytest.param(("cpu", REFERENCE_KERNEL), id=f"cpu-{REFERENCE_KERNEL}"),
    pytest.param(("cuda", "flash_attention_2"), id="cuda-flash_attention_2",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not flash_attention_available(), reason=NEEDS_FLASH_ATTENTION)]),
])
def backend(request, monkeypatch) -> tuple[str, str]:
    device, attn = request.param
    if attn == REFERENCE_KERNEL:
        flash_reference.install(monkeypatch)
        attn = "flash_attention_2"
    return device, attn


@pytest.fixture
def reference_kernel(monkeypatch) -> flash_reference.Recorder:
    return flash_reference.install(monkeypatch)


def half_model(family: str, device: str, attn: str):
    return models.model(family, attn=attn, dtype=torch.float16).to(device)


def use_kernel(model, attn: str) -> None:
    """Attention modules read the kernel from the config at call time."""
    for config in (model.config, model.config.text_config, model.config.vision_config):
        config._attn_implementation = attn


def on(device: str, inputs: dict) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_all_keeps_one_is_the_stock_model_in_float16(backend, family):
    device, attn = backend
    model = half_model(family, device, attn)
    samples = [Sample("What happens in this clip?", video(family, 0)), Sample("Describe it.", video(family, 0))]
    inputs = on(device, models.batch(family, samples))
    stock_tokens, stock_logits = generate(model, inputs, max_new_tokens=4)
    v2drop.enable(model, IDENTITY)
    tokens, logits = generate(model, inputs, max_new_tokens=4)
    assert torch.equal(tokens, stock_tokens)
    torch.testing.assert_close(logits.float(), stock_logits.float(), rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lone_sample_with_drops_agrees_with_sdpa(backend, family):
    """A batch of one after drops: its positions have gaps, which flash-attention would read as
    packed sequences if the layers saw them. The kept tokens and the answer must match sdpa's."""
    device, attn = backend
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


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_attention_path_on_a_padded_batch_with_drops_matches_sdpa(reference_kernel, family):
    """Left padding, different prompt and visual lengths, a text-only row: every language-model
    call is unpadded into exactly one sequence per sample, and the answers are sdpa's."""
    model = models.model(family, attn="flash_attention_2")
    samples = mixed_samples(family)
    inputs = models.batch(family, samples)
    stock_tokens, stock_logits = generate(model, inputs)
    v2drop.enable(model, DROP)
    tokens, logits = generate(model, inputs)
    kept = [s["kept_visual_positions_per_stage"] for s in v2drop.last_stats(model)]
    language_calls = reference_kernel.causal_calls()
    assert language_calls and all(c.varlen and c.sequences == len(samples) for c in language_calls)

    use_kernel(model, "sdpa")
    sdpa_tokens, sdpa_logits = generate(model, inputs)
    assert [s["kept_visual_positions_per_stage"] for s in v2drop.last_stats(model)] == kept
    assert torch.equal(tokens, sdpa_tokens)
    torch.testing.assert_close(logits, sdpa_logits, rtol=0, atol=1e-5)
    # The reference kernel itself: the stock model under it is the stock model under sdpa.
    v2drop.disable(model)
    torch.testing.assert_close(generate(model, inputs)[1], stock_logits, rtol=0, atol=1e-5)
    assert (logits - stock_logits).abs().max() > 1e-3  # and the drops changed the answer


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lone_pruned_sample_takes_the_plain_flash_kernel(reference_kernel, family):
    """A batch of one has no padding, so flash-attention should get it whole through the plain
    kernel. Gapped position ids reaching the layers would send it through the packed-sequence
    varlen path instead, with a device sync in every layer (and split it where positions repeat)."""
    model = models.model(family, attn="flash_attention_2")
    v2drop.enable(model, DROP)
    generate(model, models.batch(family, [Sample("What happens in this clip?", video(family, 1))]))
    assert v2drop.last_stats(model)[0]["retention"] < 1.0
    language_calls = reference_kernel.causal_calls()
    assert language_calls and all(not c.varlen and c.sequences == 1 for c in language_calls)
