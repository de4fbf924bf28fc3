"""Bad input to the public API gets a ValueError that names the problem."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import v2drop
from v2drop.compat import output_cache
from vlm import testing as models


def test_unsupported_family_names_the_supported_ones():
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"'qwen2'.*\(qwen2_5_vl/qwen2_vl\).*Qwen3-VL \(qwen3_vl\).*LLaVA-OneVision"):
        v2drop.enable(model, v2drop.Schedule((1,), (0.5,)))
    assert not v2drop.is_enabled(model)


def test_drop_layer_beyond_the_model_depth_is_refused_at_enable():
    model = models.model("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"\[9\] are out of range for a model with 8 decoder layers"):
        v2drop.enable(model, v2drop.Schedule((2, 9), (0.5, 0.5)))
    assert not v2drop.is_enabled(model)


def test_last_stats_needs_enable():
    with pytest.raises(ValueError, match="not enabled"):
        v2drop.last_stats(models.model("qwen2_5_vl"))


def test_static_cache_is_refused_with_a_clear_message():
    family = "qwen2_5_vl"
    model = models.model(family)
    v2drop.enable(model, v2drop.Schedule((2,), (0.5,)))
    inputs = models.batch(family, [models.Sample("Hi?", models.Visual("video", (2, 4, 4)))])
    with pytest.raises(ValueError, match="DynamicCache"):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_enable_switches_the_schedule_in_place():
    family = "qwen2_5_vl"
    model = models.model(family)
    inputs = models.batch(family, [models.Sample("Hi?", models.Visual("video", (2, 4, 4)))])
    v2drop.enable(model, v2drop.Schedule((2,), (0.5,)))
    with torch.no_grad():
        model(**inputs)
    assert v2drop.last_stats(model)[0]["visual_tokens_per_stage"] == [8, 4]
    v2drop.enable(model, v2drop.Schedule((2,), (0.25,)))
    with torch.no_grad():
        model(**inputs)
    assert v2drop.last_stats(model)[0]["visual_tokens_per_stage"] == [8, 2]


def test_random_scorer_keeps_the_same_counts_but_other_tokens():
    family = "qwen2_5_vl"
    model = models.model(family)
    inputs = models.batch(family, [models.Sample("Hi?", models.Visual("video", (2, 8, 8)))])
    schedule = v2drop.Schedule((2, 5), (0.25, 0.5))
    v2drop.enable(model, schedule)
    with torch.no_grad():
        model(**inputs)
    variation = v2drop.last_stats(model)[0]
    v2drop.enable(model, schedule, scorer="random", seed=3)
    with torch.no_grad():
        model(**inputs)
    random = v2drop.last_stats(model)[0]
    assert random["visual_tokens_per_layer"] == variation["visual_tokens_per_layer"]
    assert random["kept_visual_positions_per_stage"] != variation["kept_visual_positions_per_stage"]


def test_unknown_scorer_is_refused():
    with pytest.raises(ValueError, match="unknown scorer 'attention'; choose one of variation, random"):
        v2drop.enable(models.model("qwen2_5_vl"), v2drop.Schedule((2,), (0.5,)), scorer="attention")


def test_select_cache_rows_takes_the_stage_masks_along():
    """Forking a pruned cache by rows (repeats allowed) keeps each row's per-stage key masks with
    it; workers.shared_prefix's tests check that generation from the fork equals unshared generation."""
    family = "qwen2_5_vl"
    model = models.model(family)
    v2drop.enable(model, v2drop.Schedule((2,), (0.5,)))
    samples = [models.Sample("Hi?", models.Visual("video", (2, 4, 4))),
               models.Sample("A longer question?", models.Visual("video", (2, 8, 4)))]
    with torch.no_grad():
        cache = output_cache(model(**models.batch(family, samples), use_cache=True))
    state = model._v2drop_state
    masks, keys = [m.clone() for m in state.stage_masks.masks], [layer.keys.clone() for layer in cache.layers]
    index = torch.tensor([1, 0, 1])
    v2drop.select_cache_rows(model, cache, index)
    assert [m.tolist() for m in state.stage_masks.masks] == [m[index].tolist() for m in masks]
    assert all(torch.equal(layer.keys, k[index]) for layer, k in zip(cache.layers, keys))
    assert masks[0].shape[1] > masks[1].shape[1]  # the stages really differ in length
