"""v2drop.prefill_stats: one VisualStats per sample in the output columns' names, for the patched
and the stock model alike, and `continued` for a question after a shared prefill."""

import pytest
import torch

import v2drop
from v2drop.flops import TextShape, continuation_flops, prefill_flops
from vlm import testing as models

FAMILY = "qwen2_5_vl"
SAMPLES = [models.Sample("Hi?", models.Visual("video", (2, 4, 4))),
           models.Sample("What is going on here?", models.Visual("video", (2, 8, 8)))]


def run(model, inputs) -> list[v2drop.VisualStats]:
    marker = v2drop.stats_marker(model)
    with torch.no_grad():
        model(**inputs)
    return v2drop.prefill_stats(model, inputs["input_ids"], inputs["attention_mask"], marker)


def test_stock_model_has_one_stage_full_retention_and_equal_flops():
    model, inputs = models.model(FAMILY), models.batch(FAMILY, SAMPLES)
    shape = TextShape.from_config(model.config.get_text_config())
    prompts = inputs["attention_mask"].sum(dim=1).tolist()
    stats = run(model, inputs)
    assert [s.visual_tokens_per_stage for s in stats] == [[models.num_visual_tokens(FAMILY, s.visual)] for s in SAMPLES]
    assert [s.retention_achieved for s in stats] == [1.0, 1.0]
    assert [s.flops_full for s in stats] == [prefill_flops(shape, [n] * shape.num_layers) for n in prompts]
    assert all(s.flops_dropped == s.flops_full for s in stats)
    assert [s.cached_tokens_per_layer for s in stats] == [[n] * shape.num_layers for n in prompts]
    assert set(stats[0].columns()) == {"retention_achieved", "visual_tokens_per_stage", "flops_full", "flops_dropped"}


def test_patched_model_reports_the_engine_numbers_under_the_column_names():
    model, inputs = models.model(FAMILY), models.batch(FAMILY, SAMPLES)
    v2drop.enable(model, v2drop.Schedule((2,), (0.5,)))
    stats = run(model, inputs)
    engine = v2drop.last_stats(model)
    assert [s.visual_tokens_per_stage for s in stats] == [e["visual_tokens_per_stage"] for e in engine]
    assert [s.retention_achieved for s in stats] == [e["retention"] for e in engine]
    assert [(s.flops_full, s.flops_dropped) for s in stats] == [(e["prefill_flops_full"], e["prefill_flops"]) for e in engine]
    assert all(s.flops_dropped < s.flops_full and s.retention_achieved < 1.0 for s in stats)
    assert stats[0].cached_tokens_per_layer[0] > stats[0].cached_tokens_per_layer[-1]  # later layers hold fewer


def test_a_call_that_did_not_drop_reports_stock_numbers(caplog):
    model, inputs = models.model(FAMILY), models.batch(FAMILY, SAMPLES)
    v2drop.enable(model, v2drop.Schedule((2,), (0.5,)))
    run(model, inputs)
    marker = v2drop.stats_marker(model)  # no forward after this: the engine's stats are stale
    stats = v2drop.prefill_stats(model, inputs["input_ids"], inputs["attention_mask"], marker)
    assert all(s.retention_achieved == 1.0 and s.flops_dropped == s.flops_full for s in stats)
    assert "did not drop" in caplog.text


def test_continued_splits_the_prefill_and_adds_the_question_over_the_cache():
    model = models.model(FAMILY)
    shape = TextShape.from_config(model.config.get_text_config())
    layers = shape.num_layers
    prefill = v2drop.VisualStats(0.5, [8, 4], 900.0, 600.0, [20] * 2 + [16] * (layers - 2))
    item = v2drop.continued(model, prefill, new_tokens=3, sharers=3)
    assert item.flops_full == pytest.approx(300.0 + continuation_flops(shape, 3, [20] * layers))
    assert item.flops_dropped == pytest.approx(200.0 + continuation_flops(shape, 3, prefill.cached_tokens_per_layer))
    assert (item.retention_achieved, item.visual_tokens_per_stage) == (0.5, [8, 4])
