"""V²Drop inside real transformers models: stock equivalence, a slow reference, batching."""

from __future__ import annotations

import pytest
import torch

import v2drop
from v2drop import reference
from vlm import testing as models
from vlm.families import FAMILIES as ROWS
from vlm.testing import Sample, Visual

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision")
IDENTITY = v2drop.Schedule(layers=(1, 4, 6), keep=(1.0, 1.0, 1.0))
DROP = v2drop.Schedule(layers=(2, 4, 6), keep=(0.5, 0.5, 0.0))
# Drops at layer 1, before the tiny Qwen3-VL's last DeepStack addition (after layers 0 and 1):
# the kept tokens must take their additions with them.
EARLY = v2drop.Schedule(layers=(1, 4, 6), keep=(0.5, 0.5, 0.0))
SCHEDULES = [pytest.param(DROP, id="drop-2-4-6"), pytest.param(EARLY, id="drop-1-4-6")]


def video(family: str, size: int = 0) -> Visual:
    if ROWS[family].patch_grid_inputs:
        return Visual("video", ((2, 4, 4), (2, 6, 4), (1, 4, 8))[size])
    return Visual("video", (2, 0, 0))


def mixed_samples(family: str) -> list[Sample]:
    """Different prompt lengths, different visual counts (Qwen), one sample without visuals."""
    return [
        Sample("What happens in this clip?", video(family, 0)),
        Sample("Describe it.", video(family, 1)),
        Sample("Tell me a long and detailed story about the colours, the people and the places.", video(family, 2)),
        Sample("Only text here, no video at all.", None),
    ]


def generate(model, inputs, max_new_tokens=5):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    return new_tokens, torch.stack(out.logits, dim=1)  # [B, T], [B, T, V]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_all_keeps_one_is_the_stock_model(family, attn):
    model = models.model(family, attn=attn)
    samples = mixed_samples(family)
    inputs = models.batch(family, samples)
    stock_tokens, stock_logits = generate(model, inputs)
    v2drop.enable(model, IDENTITY)
    tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, stock_tokens)
    torch.testing.assert_close(logits, stock_logits, rtol=0, atol=1e-5)
    stats = v2drop.last_stats(model)
    assert [s["retention"] for s in stats] == [1.0] * len(samples)
    assert stats[0]["visual_tokens_per_layer"] == [models.num_visual_tokens(family, samples[0].visual)] * 8


def test_identity_with_an_image():
    family = "qwen2_5_vl"
    model = models.model(family)
    samples = [Sample("What is in the picture?", Visual("image", (1, 4, 6))), Sample("And this one?", video(family))]
    inputs = models.batch(family, samples)
    stock_tokens, stock_logits = generate(model, inputs)
    v2drop.enable(model, IDENTITY)
    tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, stock_tokens)
    torch.testing.assert_close(logits, stock_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_slow_reference_in_float64(family, schedule):
    model = models.model(family, dtype=torch.float64)
    sample = Sample("What happens in this clip?", video(family, 1))
    inputs = models.batch(family, [sample])
    visual_ids = v2drop.api.adapter_for(model).visual_token_ids(model)
    ref_tokens, ref_logits = reference.generate(model, inputs, schedule, visual_ids, max_new_tokens=6)
    v2drop.enable(model, schedule)
    tokens, logits = generate(model, inputs, max_new_tokens=6)
    assert tokens[0].tolist() == ref_tokens
    # generate() hands logits back in float32; the float64 computations agree far below that.
    torch.testing.assert_close(logits[0], ref_logits.to(logits.dtype), rtol=0, atol=1e-6)
    # The reference really dropped: the stock model gives different logits.
    v2drop.disable(model)
    _, stock_logits = generate(model, inputs, max_new_tokens=6)
    assert (stock_logits[0] - ref_logits).abs().max() > 1e-6


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_sample_in_a_padded_batch_equals_the_sample_alone(family, schedule):
    model = models.model(family)
    v2drop.enable(model, schedule)
    samples = mixed_samples(family)
    inputs = models.batch(family, samples)
    tokens, logits = generate(model, inputs)
    batch_stats = v2drop.last_stats(model)
    for i in range(len(samples)):
        single_tokens, single_logits = generate(model, models.select(inputs, family, samples, i))
        assert torch.equal(tokens[i], single_tokens[0]), f"sample {i}"
        torch.testing.assert_close(logits[i], single_logits[0], rtol=1e-4, atol=1e-4)
        if samples[i].visual is not None:
            single_stats = v2drop.last_stats(model)[0]
            assert batch_stats[i]["visual_tokens_per_layer"] == single_stats["visual_tokens_per_layer"]
            assert batch_stats[i]["kept_visual_positions_per_stage"] != []


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_counts_follow_the_schedule(family):
    model = models.model(family)
    schedule = v2drop.Schedule.for_retention(num_layers=8, retention=0.25)
    v2drop.enable(model, schedule)
    samples = mixed_samples(family)
    generate(model, models.batch(family, samples), max_new_tokens=2)
    for sample, stats in zip(samples, v2drop.last_stats(model)):
        n = models.num_visual_tokens(family, sample.visual) if sample.visual else 0
        expected = schedule.tokens_per_layer(n, 8)
        assert stats["visual_tokens_per_layer"] == expected
        assert stats["visual_tokens_per_stage"] == [expected[0], *(expected[l] for l in schedule.layers)]
        if n:
            assert stats["retention"] == pytest.approx(sum(expected) / (8 * n))
            assert stats["retention"] <= 0.25 + 1e-9
            assert stats["prefill_flops"] < stats["prefill_flops_full"]


def test_kept_tokens_are_deterministic_and_chosen_per_sample():
    family = "qwen2_5_vl"
    model = models.model(family)
    v2drop.enable(model, DROP)
    samples = [Sample("First question?", video(family, 1)), Sample("Second?", video(family, 1))]
    inputs = models.batch(family, samples, seed=1)
    # Different pixels per sample: each must get its own top-k, not sample 0's.
    inputs["pixel_values_videos"][: inputs["pixel_values_videos"].shape[0] // 2] *= -3
    generate(model, inputs, max_new_tokens=1)
    first = [s["kept_visual_positions_per_stage"] for s in v2drop.last_stats(model)]
    generate(model, inputs, max_new_tokens=1)
    second = [s["kept_visual_positions_per_stage"] for s in v2drop.last_stats(model)]
    assert first == second
    offsets = [int((inputs["attention_mask"][b] == 0).sum()) for b in range(2)]
    relative = [[p - offsets[b] for p in first[b][0]] for b in range(2)]
    assert relative[0] != relative[1]


def test_keep_zero_drops_every_visual_token_but_no_text():
    family = "qwen2_5_vl"
    model = models.model(family)
    v2drop.enable(model, v2drop.Schedule(layers=(1,), keep=(0.0,)))
    samples = mixed_samples(family)
    tokens, _ = generate(model, models.batch(family, samples), max_new_tokens=3)
    for stats in v2drop.last_stats(model):
        assert stats["visual_tokens_per_layer"][1:] == [0] * 7
    assert tokens.shape == (len(samples), 3)


def test_enable_twice_is_harmless_and_disable_restores_stock():
    family = "qwen2_5_vl"
    model = models.model(family)
    inputs = models.batch(family, mixed_samples(family))
    stock_tokens, stock_logits = generate(model, inputs)
    v2drop.enable(model, DROP)
    dropped_tokens, dropped_logits = generate(model, inputs)
    v2drop.enable(model, DROP)
    again_tokens, again_logits = generate(model, inputs)
    assert torch.equal(again_tokens, dropped_tokens) and torch.equal(again_logits, dropped_logits)
    v2drop.disable(model)
    v2drop.disable(model)
    tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, stock_tokens) and torch.equal(logits, stock_logits)
    assert not v2drop.is_enabled(model)


def test_text_only_batches_run_the_stock_path():
    family = "qwen2_5_vl"
    model = models.model(family)
    inputs = models.batch(family, [Sample("Just text.", None), Sample("More text here please.", None)])
    stock_tokens, stock_logits = generate(model, inputs)
    v2drop.enable(model, DROP)
    tokens, logits = generate(model, inputs)
    assert torch.equal(tokens, stock_tokens) and torch.equal(logits, stock_logits)
    assert v2drop.last_stats(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_never_see_positions_that_flash_attention_reads_as_packed(family):
    """After a drop, a lone sample's surviving positions have gaps. flash_attention_2 reads gapped
    position_ids of a batch of one as several packed sequences and attends within each piece, so
    the layers must get positions only through the gathered cos/sin. This checks, with transformers'
    own test, what flash-attention would see; CPU cannot run the kernel itself."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    model = models.model(family)
    v2drop.enable(model, DROP)
    seen = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
        for layer in model.model.language_model.layers
    ]
    try:
        generate(model, models.batch(family, [Sample("What happens in this clip?", video(family, 1))]), max_new_tokens=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert v2drop.last_stats(model)[0]["visual_tokens_per_layer"][-1] == 0  # the drops did happen
    assert len(seen) == 2 * len(model.model.language_model.layers)  # prefill + one decode step
    assert not any(_is_packed_sequence(p, batch_size=1) for p in seen if p is not None)
