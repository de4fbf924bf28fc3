"""generation.decode_engine: the model stage decodes on the static engine (v2drop.static_decode)
when greedy, and its rows equal the dynamic engine's (generate() on a DynamicCache) for every
family, V²Drop on, clips of different sizes in one padded call, plain and shared-prefix calls.
A failing static engine costs no caption: the call is decoded again on the dynamic engine and
the rows say why."""

from __future__ import annotations

import dataclasses
import time
import weakref

import pytest
import torch

from tests.workers.test_model_stage import CAPTION, GREEDY, as_batch, model_cfg
from tests.workers.test_shared_prefix import CLIPS, QA
from v2drop import static_decode
from workers import generation
from workers import model_stage as model_stage_module
from workers.generation import run_decode
from workers.model_stage import load_for_stage
from workers.provenance import engine_fingerprint
from workers.settings import ConfigError, GenerationConfig, PromptConfig

FAILED_ATTEMPT_S = 0.5  # a failed static attempt's time, which the rows' prefill_ms must not hold
SAME = ("clip_id", "prompt", "status", "output_text", "output_tokens", "prompt_tokens", "visual_tokens_per_stage")


@pytest.fixture(scope="module", params=list(CLIPS))
def loaded(request, tmp_path_factory):
    family = request.param
    return family, load_for_stage(model_cfg(f"tiny:{family}", 0.25, str(tmp_path_factory.mktemp("cache"))))


def rows_for(loaded_model, family: str, prompt_cfg: PromptConfig, engine: str) -> list[dict]:
    rows = as_batch(list(CLIPS[family])).to_pylist()
    return model_stage_module.answer_rows(loaded_model, rows, prompt_cfg, dataclasses.replace(GREEDY, decode_engine=engine))


@pytest.mark.parametrize("penalty", [None, 1.3], ids=["plain", "repetition-penalty"])
@pytest.mark.parametrize("prompt_cfg", [CAPTION, QA], ids=["caption", "qa-shared-prefix"])
def test_static_engine_rows_equal_the_dynamic_engine_rows(loaded, prompt_cfg, penalty, monkeypatch):
    """With a repetition penalty in the model's generation_config too (Qwen2.5-VL Instruct ships
    one), which the static step applies itself, over the shared video prefix as well."""
    family, model = loaded
    monkeypatch.setattr(model.model.generation_config, "repetition_penalty", penalty)
    static = rows_for(model, family, prompt_cfg, "static")
    dynamic = rows_for(model, family, prompt_cfg, "dynamic")
    assert [{k: r[k] for k in SAME} for r in static] == [{k: r[k] for k in SAME} for r in dynamic]
    assert all(r["status"] == "ok" and r["fallback_reason"] is None for r in static)
    assert any(r["output_tokens"] > 0 for r in static)


@pytest.mark.parametrize("prompt_cfg", [CAPTION, QA], ids=["caption", "qa-shared-prefix"])
def test_a_failing_static_engine_falls_back_to_dynamic_and_says_so(loaded, prompt_cfg, monkeypatch):
    """...after freeing what the failed attempt held (its static cache), which the error's
    traceback keeps alive while its except clause runs. A shared video prefix is prefilled again
    for the retry (the failed attempt consumed its cache), in the same call: still shared, no
    call split."""
    family, model = loaded
    static_caches: list[weakref.ref] = []
    held_while_dynamic: list[bool] = []

    def broken(*args, **kwargs):
        cache = torch.zeros(4, 64)
        static_caches.append(weakref.ref(cache))
        time.sleep(FAILED_ATTEMPT_S)
        raise RuntimeError("injected static-engine failure")

    def watched_decode(model_, inputs, generation_cfg, engine, **kwargs):
        if engine == "dynamic":
            held_while_dynamic.append(any(ref() is not None for ref in static_caches))
        return run_decode(model_, inputs, generation_cfg, engine, **kwargs)

    dynamic = rows_for(model, family, prompt_cfg, "dynamic")
    monkeypatch.setattr(static_decode, "generate_static", broken)
    monkeypatch.setattr(generation, "run_decode", watched_decode)
    rows = rows_for(model, family, prompt_cfg, "static")
    assert [{k: r[k] for k in SAME} for r in rows] == [{k: r[k] for k in SAME} for r in dynamic]
    assert all(r["fallback_reason"].startswith("static decode failed (RuntimeError: injected") for r in rows)
    assert held_while_dynamic and not any(held_while_dynamic)
    assert all(r["fallback_batch_id"] == r["batch_id"] for r in rows)  # each failed call counted in the summary
    assert len(static_caches) == len({r["batch_id"] for r in rows}) == len({r["batch_id"] for r in dynamic})
    assert [r["video_prefill_shared"] for r in rows] == [r["video_prefill_shared"] for r in dynamic]
    assert all(r["prefill_ms"] < FAILED_ATTEMPT_S * 1000 for r in rows)  # the retry's own, not the failed attempt's


def test_generation_settings_the_static_engine_does_not_apply_send_every_call_to_generate(loaded, monkeypatch):
    """no_repeat_ngram_size in the model's generation_config: generate() applies it, the static
    step would not, so the static engine is not tried (no second prefill) and the rows say why."""
    family, model = loaded
    monkeypatch.setattr(model.model.generation_config, "no_repeat_ngram_size", 2)
    dynamic = rows_for(model, family, CAPTION, "dynamic")
    monkeypatch.setattr(static_decode, "generate_static", lambda *args, **kwargs: pytest.fail("static engine tried"))
    decodes: list[str] = []
    monkeypatch.setattr(generation, "run_decode", lambda m, i, c, engine, **kw: decodes.append(engine) or run_decode(m, i, c, engine, **kw))
    rows = rows_for(model, family, CAPTION, "static")
    assert decodes == ["dynamic"] * len({r["batch_id"] for r in rows})  # once per call, not twice
    assert [{k: r[k] for k in SAME} for r in rows] == [{k: r[k] for k in SAME} for r in dynamic]
    assert all("['no_repeat_ngram_size']" in r["fallback_reason"] and r["fallback_batch_id"] == r["batch_id"] for r in rows)


def test_sampling_samples_though_the_model_ships_greedy_like_defaults(loaded, monkeypatch):
    """Qwen2-VL Instruct's generation_config holds top_k=1 (top_p=0.001, temperature=0.01), which
    generate() merges under the job's settings: unless the job's sampling sets top_k too, every
    sample is the argmax and generation.temperature does nothing."""
    family, model = loaded
    for name, value in {"top_k": 1, "top_p": 0.001, "temperature": 0.01}.items():
        monkeypatch.setattr(model.model.generation_config, name, value)
    greedy = [r["output_text"] for r in rows_for(model, family, CAPTION, "dynamic")]
    rows = as_batch(list(CLIPS[family])).to_pylist()
    torch.manual_seed(0)
    sampled = [r["output_text"] for r in model_stage_module.answer_rows(
        model, rows, CAPTION, dataclasses.replace(GREEDY, temperature=1.0, top_p=1.0))]
    assert sampled != greedy


def test_auto_is_static_when_greedy_and_dynamic_when_sampling():
    assert dataclasses.replace(GREEDY, decode_engine="auto").engine() == "static"
    assert dataclasses.replace(GREEDY, temperature=0.7, decode_engine="auto").engine() == "dynamic"
    assert dataclasses.replace(GREEDY, decode_engine="dynamic").engine() == "dynamic"


def test_static_with_sampling_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="generation.decode_engine"):
        GenerationConfig(temperature=0.7, decode_engine="static")
    with pytest.raises(ConfigError, match="generation.decode_engine"):
        GenerationConfig(decode_engine="graph")


def test_the_engine_is_part_of_the_fingerprint():
    """Rows decoded by the other engine are redone on resume: bf16 kernels differ between them."""
    cfg = model_cfg()
    assert engine_fingerprint(cfg, dataclasses.replace(GREEDY, decode_engine="static"), None) != \
        engine_fingerprint(cfg, dataclasses.replace(GREEDY, decode_engine="dynamic"), None)
    assert engine_fingerprint(cfg, dataclasses.replace(GREEDY, decode_engine="static"), None) == \
        engine_fingerprint(cfg, dataclasses.replace(GREEDY, decode_engine="auto"), None)
