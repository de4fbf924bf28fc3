"""workers.shared_prefix: one video prefill per clip for all its questions, against one full
prompt per question (the unshared path), with tiny random-weight models on CPU."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from bench.op_counts import OpCounter
from tests.v2drop import flash_reference
from tests.v2drop.test_attention_backends import use_kernel
from tests.workers.test_model_stage import GREEDY, as_batch, clip_row, model_cfg
from v2drop.flops import TextShape, prefill_flops
from vlm.families import visual_token_ids
from workers import model_calls, shared_prefix
from workers import model_stage as model_stage_module
from workers.device_inputs import move_inputs
from workers.model_inputs import build_inputs
from workers.model_stage import load_for_stage
from workers.rows import GenResult
from workers.settings import PromptConfig

QUESTIONS = ["What happens in this clip?", "Who?", "Tell me a long story about the colours, the people and the places."]
QA = PromptConfig(task="qa", questions=QUESTIONS[:2], system="Be brief.")
# Clip b's 6 frames at 2 fps give temporal M-RoPE positions (0, 2, 4) that run past its spatial
# ones (84 x 56 px -> 3 x 2 merged patches): the case where Qwen's stored rope deltas are off by one.
CLIPS = {
    "qwen2_5_vl": (clip_row("a", 4, 56, 56, seed=1), clip_row("b", 6, 84, 56, seed=2)),
    "qwen3_vl": (clip_row("a", 4, 64, 64, seed=1), clip_row("b", 6, 96, 64, seed=2)),  # timestamped frame spans
    "llava_onevision": (clip_row("a", 4, 56, 56, seed=1), clip_row("b", 4, 84, 56, seed=2)),  # equal frame counts
}
GENERATE = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, request):
    family, retention = request.param
    return family, load_for_stage(model_cfg(f"tiny:{family}", retention, str(tmp_path_factory.mktemp("cache"))))


def items_for(family: str):
    """Clips with different sizes, 2 and 3 questions of different lengths."""
    a, b = CLIPS[family]
    return [(a, QUESTIONS[0]), (a, QUESTIONS[1]), (b, QUESTIONS[0]), (b, QUESTIONS[1]), (b, QUESTIONS[2])]


def test_continuation_rows_are_prefix_middle_pad_suffix() -> None:
    ids, mask = shared_prefix.continuation_batch(
        torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]), [[7], [8, 9]], [0, 0], pad_id=0
    )
    assert ids.tolist() == [[0, 5, 6, 0, 7], [0, 5, 6, 8, 9]]
    assert mask.tolist() == [[0, 1, 1, 0, 1], [0, 1, 1, 1, 1]]


def test_calls_hold_whole_clips_when_sharing() -> None:
    a, b, c = ({"clip": name} for name in "abc")
    items = [(a, "q1"), (a, "q2"), (b, "q1"), (c, "q1"), (c, "q2")]

    def no_budget() -> int:
        return len(items)

    assert list(model_calls.planned_calls(items, list(range(5)), 2, True, no_budget)) == [[0, 1, 2], [3, 4]]
    assert list(model_calls.planned_calls(items, list(range(5)), 2, False, no_budget)) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("loaded", [(f, r) for f in CLIPS for r in (1.0, 0.25)], indirect=True,
                         ids=lambda p: f"{p[0]}-retention-{p[1]}")
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2-reference-kernel"])
def test_shared_prefill_gives_the_logits_of_one_prompt_per_question(loaded, attn, monkeypatch) -> None:
    """Middle padding, left padding, different prefix lengths, under sdpa and under transformers'
    flash_attention_2 path (tests/v2drop/flash_reference.py: only the CUDA kernel is replaced)."""
    family, model_and_processor = loaded
    if attn == "sdpa":
        check_shared_against_unshared(family, model_and_processor)
        return
    flash_reference.install(monkeypatch)
    use_kernel(model_and_processor.model, "flash_attention_2")
    try:
        check_shared_against_unshared(family, model_and_processor)
    finally:
        use_kernel(model_and_processor.model, "sdpa")  # the model is shared by the module's tests


def check_shared_against_unshared(family: str, model_and_processor) -> None:
    model, processor = model_and_processor.model, model_and_processor.processor
    items = items_for(family)
    with torch.no_grad():
        full = move_inputs(build_inputs(processor, items, "Be brief."), model)
        unshared = model.generate(**full, **GENERATE, pad_token_id=processor.tokenizer.pad_token_id)
        call = shared_prefix.plan(processor, items, "Be brief.", visual_token_ids(model.config))
        prefix = move_inputs(shared_prefix.prefix_inputs(processor, items, call), model)
        inputs, clip_stats = shared_prefix.prefill_and_fork(model, processor, call, prefix)
        shared = model.generate(**inputs, **GENERATE, pad_token_id=processor.tokenizer.pad_token_id)

    assert call.owner == [0, 0, 1, 1, 1] and prefix["input_ids"].shape[0] == 2  # one prefill row per clip
    assert torch.equal(shared.sequences[:, inputs["input_ids"].shape[1]:], unshared.sequences[:, full["input_ids"].shape[1]:])
    torch.testing.assert_close(torch.stack(shared.logits, 1), torch.stack(unshared.logits, 1), rtol=0, atol=1e-5)
    if model_and_processor.retention_asked < 1:
        assert all(s.retention_achieved < 0.5 for s in clip_stats)


@pytest.mark.parametrize("loaded", [("qwen2_5_vl", 0.25)], indirect=True, ids=["qwen2_5_vl"])
def test_the_fused_video_prefill_makes_3_fewer_matrix_products_per_layer_for_the_same_logits(loaded) -> None:
    """fused=True (what the static engine's calls use): q/k/v and gate/up as one product each in
    every text layer; the vision tower and lm_head as before."""
    family, model_and_processor = loaded
    model, processor = model_and_processor.model, model_and_processor.processor
    items = items_for(family)
    call = shared_prefix.plan(processor, items, "Be brief.", visual_token_ids(model.config))
    prefix = move_inputs(shared_prefix.prefix_inputs(processor, items, call), model)
    products, logits = {}, {}
    for fused in (False, True):
        with torch.no_grad(), OpCounter() as counter:
            inputs, _ = shared_prefix.prefill_and_fork(model, processor, call, prefix, fused=fused)
        products[fused] = counter.calls["aten.mm"] + counter.calls["aten.addmm"]
        with torch.no_grad():
            out = model.generate(**inputs, **GENERATE, pad_token_id=processor.tokenizer.pad_token_id)
        logits[fused] = torch.stack(out.logits, 1)
    assert products[False] - products[True] == 3 * model.config.get_text_config().num_hidden_layers
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-5)


@pytest.mark.parametrize("loaded", [("qwen2_5_vl", 1.0)], indirect=True, ids=["qwen2_5_vl"])
def test_qa_rows_are_the_same_with_one_video_prefill_per_clip(loaded) -> None:
    family, model_and_processor = loaded
    videos_encoded = []  # videos per vision-encoder call
    hook = model_and_processor.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, out: videos_encoded.append(kwargs["grid_thw"].shape[0]), with_kwargs=True
    )
    rows = as_batch(list(CLIPS[family])).to_pylist()
    try:
        shared = model_stage_module.answer_rows(model_and_processor, rows, QA, GREEDY)
        assert videos_encoded == [2]  # both clips in one call, each once
        unshared = model_stage_module.answer_rows(model_and_processor, rows, QA, dataclasses.replace(GREEDY, share_video_prefix=False))
        assert videos_encoded == [2, 2, 2]  # 2 items per call, each with its own copy of its video
    finally:
        hook.remove()

    same = ("clip_id", "prompt", "status", "output_text", "output_tokens", "prompt_tokens", "visual_tokens_per_stage")
    assert [{k: r[k] for k in same} for r in shared] == [{k: r[k] for k in same} for r in unshared]
    # the rows say how their video was fed (not asked to share: no reason)
    assert {(r["video_prefill_shared"], r["video_prefill_unshared_reason"]) for r in shared} == {(True, None)}
    assert {(r["video_prefill_shared"], r["video_prefill_unshared_reason"]) for r in unshared} == {(False, None)}
    # FLOPs: each clip's prefix is counted once, split over its questions, instead of once per question.
    shape = TextShape.from_config(model_and_processor.model.config.get_text_config())
    call = shared_prefix.plan(model_and_processor.processor, [(r, q) for r in rows for q in QA.questions], "Be brief.",
                              visual_token_ids(model_and_processor.model.config))
    for clip in range(2):
        indices = call.clip_items[clip]
        prefix_tokens = shared[indices[0]]["prompt_tokens"] - len(call.suffix_ids[indices[0]])
        saved = (len(indices) - 1) * prefill_flops(shape, [prefix_tokens] * shape.num_layers)
        assert sum(unshared[i]["flops_full"] for i in indices) - sum(shared[i]["flops_full"] for i in indices) == pytest.approx(saved)


def test_a_template_that_puts_the_question_first_is_not_shared(caplog, monkeypatch) -> None:
    """Then no prefix is common to a clip's questions; the call runs unshared instead, and says why
    in the log and in its rows."""
    from types import SimpleNamespace

    from vlm import testing as models

    def question_first(messages, **kwargs):
        question = messages[-1]["content"][1]["text"]
        return f"<|im_start|>user\n{question}<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"

    tokenizer = models.tokenizer("qwen2_5_vl")
    processor = SimpleNamespace(apply_chat_template=question_first, tokenizer=tokenizer)
    row, video_pad = clip_row("a", 4, 56, 56), tokenizer.convert_tokens_to_ids("<|video_pad|>")
    items = [(row, "What happens?"), (row, "Who?"), (clip_row("b", 4, 56, 56), "What happens?")]
    assert shared_prefix.plan(processor, items, None, [video_pad]) == "the chat template puts no video before the prompt"
    config = SimpleNamespace(model_type="qwen2_5_vl", image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                             video_token_id=video_pad)
    loaded = SimpleNamespace(model=SimpleNamespace(config=config), processor=processor, inputs_device=None)
    with caplog.at_level(logging.WARNING, logger="workers.model_calls"):
        plan = model_calls.plan_call(loaded, items, None, share=True)
    assert plan == model_calls.CallPlan(None, fallback="the chat template puts no video before the prompt")
    assert "share_video_prefix" in caplog.text and "no video before the prompt" in caplog.text
    assert model_calls.plan_call(loaded, items, None, share=False) == model_calls.CallPlan(None)  # not asked: no log
    assert model_calls.plan_call(loaded, items[2:], None, share=True) == model_calls.CallPlan(None)  # nothing to share
    # the unshared call's rows carry the reason (the model call itself is stubbed: only the rows' bookkeeping is checked)
    monkeypatch.setattr(model_calls, "build_inputs", lambda processor, items, system, device: items)
    monkeypatch.setattr(model_calls, "timed_inputs", lambda model, make: (make(), 0.0))
    monkeypatch.setattr(model_calls, "generate_batch", lambda model, processor, inputs, cfg, inputs_ms: [GenResult() for _ in inputs])
    results = model_calls.generate_items(loaded, items, None, GREEDY)
    assert [(r.video_prefill_shared, r.video_prefill_unshared_reason) for r in results] == \
        [(False, "the chat template puts no video before the prompt")] * 2 + [(False, None)]  # b: nothing to share
    # a shared call: clip b's one prompt prefilled its video for itself alone
    monkeypatch.setattr(model_calls, "plan_call", lambda *args: model_calls.CallPlan(shared=object()))  # type: ignore[arg-type]
    monkeypatch.setattr(shared_prefix, "generate_shared", lambda model, processor, items, *args: [GenResult() for _ in items])
    results = model_calls.generate_items(loaded, items, None, GREEDY)
    assert [(r.video_prefill_shared, r.video_prefill_unshared_reason) for r in results] == [(True, None)] * 2 + [(False, None)]
