"""Greedy decoding on the preallocated per-stage cache gives generate()'s tokens, stock and V²Drop,
for the three families, on left-padded batches; it stops once every row has finished.

Runs the static-shape step uncaptured (CPU); capture is a CUDA-only option of the same function.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, SuppressTokensLogitsProcessor

import v2drop
from tests.v2drop import flash_reference
from v2drop import stage_cache, static_decode
from v2drop.greedy import UnappliedSettings, seen_tokens
from vlm import testing as models

NUM_LAYERS = 8
QUESTIONS = ["Describe.", "What happens in this long clip here?"]


def _setup(family: str, dropping: bool, attn: str = "sdpa"):
    model = models.model(family, num_layers=NUM_LAYERS, attn=attn)
    visual = models.Visual("video", (2, 0, 0) if family == "llava_onevision" else (2, 8, 8))
    inputs = models.batch(family, [models.Sample(q, visual) for q in QUESTIONS])
    if dropping:
        v2drop.enable(model, v2drop.Schedule.for_retention(NUM_LAYERS, 0.25))
    return model, inputs


def _reference(model, inputs, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("dropping", [False, True], ids=["stock", "v2drop"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_static_cache_tokens_equal_generate(family, dropping):
    model, inputs = _setup(family, dropping)
    expected = _reference(model, inputs, 10)
    assert static_decode.generate_static(model, inputs, 10).tolist() == expected.tolist()


@pytest.mark.parametrize("dropping", [False, True], ids=["stock", "v2drop"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_static_cache_tokens_equal_generate_under_flash_attention(family, dropping, monkeypatch):
    """flash_attention_2, the GPU default: transformers' flash path with a plain-torch kernel. The
    step's additive key mask is not a flash padding mask: it attends by one_token_sdpa instead."""
    flash_reference.install(monkeypatch)
    model, inputs = _setup(family, dropping, attn="flash_attention_2")
    expected = _reference(model, inputs, 10)
    assert static_decode.generate_static(model, inputs, 10).tolist() == expected.tolist()
    assert model.config.get_text_config()._attn_implementation == "flash_attention_2"  # put back


@pytest.mark.parametrize("dropping", [False, True], ids=["stock", "v2drop"])
def test_the_models_repetition_penalty_and_the_calls_end_tokens_are_generates(dropping):
    """Qwen2.5-VL Instruct ships repetition_penalty 1.05 with sampling settings that greedy
    decoding ignores; generate() penalizes every step, so the static step must too."""
    model, inputs = _setup("qwen2_5_vl", dropping)
    free_run = _reference(model, inputs, 10)
    model.generation_config.update(repetition_penalty=1.3, top_k=1, top_p=0.001, temperature=0.1)
    penalized = _reference(model, inputs, 10)
    assert penalized.tolist() != free_run.tolist()  # the penalty changes these tokens
    assert static_decode.generate_static(model, inputs, 10).tolist() == penalized.tolist()
    end = int(penalized[0, 3])  # a token row 0 makes: passed to the call, it ends rows there
    with torch.no_grad():
        ended = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=end)[:, inputs["input_ids"].shape[1]:]
    static = static_decode.generate_static(model, inputs, 10, eos_token_id=end)
    assert static.tolist() == ended[:, :static.shape[1]].tolist() and (ended[:, static.shape[1]:] == ended[0, -1]).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_the_penalty_counts_the_prompt_tokens_generate_counts_left_padding_left_out(family):
    """generate() leaves each row's left padding out of the repetition penalty; counting it would
    penalise a padded row's pad token, an end token of the Qwen families, so that row would stop
    later than under generate(). The tokens generate()'s processor changed at the first step are
    exactly the ones the static engine counts as seen."""
    model, inputs = _setup(family, False)
    pad = model.generation_config.pad_token_id
    padded_row = int((inputs["attention_mask"][:, 0] == 0).nonzero()[0])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, repetition_penalty=1.3,
                             output_logits=True, output_scores=True, return_dict_in_generate=True)
    penalized = out.scores[0] != out.logits[0]
    seen = seen_tokens(inputs["input_ids"], penalized.shape[1], inputs["attention_mask"])
    assert torch.equal(seen, penalized)
    assert not seen[padded_row, pad]  # the pads are its only pad tokens


def test_settings_the_step_would_not_apply_are_refused_before_any_model_work(monkeypatch):
    model, inputs = _setup("qwen2_5_vl", False)
    monkeypatch.setattr(static_decode, "_prefill", lambda *args, **kwargs: pytest.fail("the model ran"))
    model.generation_config.no_repeat_ngram_size = 2
    with pytest.raises(UnappliedSettings, match="no_repeat_ngram_size"):
        static_decode.generate_static(model, inputs, 10)
    model.generation_config.no_repeat_ngram_size = 0
    with pytest.raises(UnappliedSettings, match="min_new_tokens"):
        static_decode.generate_static(model, inputs, 10, min_new_tokens=4)
    with pytest.raises(UnappliedSettings, match="do_sample"):
        static_decode.generate_static(model, inputs, 10, do_sample=True)
    # generate() runs a caller's processor at every step, the engine on the first token only
    banning = LogitsProcessorList([SuppressTokensLogitsProcessor([5, 6])])
    with pytest.raises(UnappliedSettings, match="logits_processor SuppressTokensLogitsProcessor"):
        static_decode.generate_static(model, inputs, 10, logits_processor=banning)


def test_keywords_the_engine_sets_itself_give_way_and_an_observer_runs():
    """use_cache=False (the engine needs the cache, tokens are the same) and the keywords the
    prefill passes itself are no error; a processor that only observes may ride along."""
    model, inputs = _setup("qwen2_5_vl", False)
    seen: list[int] = []

    class Observer(LogitsProcessor):
        observes_only = True

        def __call__(self, input_ids, scores):
            seen.append(scores.shape[0])
            return scores

    expected = _reference(model, inputs, 4)
    got = static_decode.generate_static(model, inputs, 4, use_cache=False, do_sample=False, return_dict_in_generate=False,
                                        logits_processor=LogitsProcessorList([Observer()]))
    assert got.tolist() == expected.tolist() and seen == [2]


def test_rows_that_all_end_at_their_first_token_give_generates_one_column():
    model, inputs = _setup("qwen2_5_vl", dropping=True)
    first = _reference(model, inputs, 1)
    model.generation_config.eos_token_id = sorted(set(first[:, 0].tolist()))
    expected = _reference(model, inputs, 6)
    assert expected.shape[1] == 1  # generate() stops at once
    assert static_decode.generate_static(model, inputs, 6).tolist() == expected.tolist()


def _selected_batches(monkeypatch) -> list[int]:
    """Records the batch size of every select_rows call (rows leaving the batch)."""
    sizes: list[int] = []
    real = static_decode.select_rows

    def spy(state, index):
        sizes.append(len(index))
        return real(state, index)

    monkeypatch.setattr(static_decode, "select_rows", spy)
    return sizes


def _end_tokens_for(free_run: torch.Tensor, plans: list[list[int | None]]) -> list[int]:
    """End tokens under which row r first ends at plan[r] (None: never), for the first plan the
    random tokens allow: the tiny models repeat tokens, so a token picked at one step may end a row
    earlier or end another row too."""
    rows = free_run.tolist()
    for plan in plans:
        ends = sorted({rows[r][k] for r, k in enumerate(plan) if k is not None})
        first = [next((i for i, tok in enumerate(row) if tok in ends), None) for row in rows]
        if first == plan:
            return ends
    raise AssertionError(f"no plan fits these tokens: {rows}")


def test_rows_that_finish_emit_pad_leave_the_batch_and_the_loop_stops_when_all_have(monkeypatch):
    model, inputs = _setup("qwen2_5_vl", dropping=True)
    free_run = _reference(model, inputs, 12)
    # Row 1 ends first, row 0 later: rows finish at different steps.
    plans = [[k0, k1] for k1 in range(1, 6) for k0 in range(k1 + 1, 11)]
    model.generation_config.eos_token_id = _end_tokens_for(free_run, plans)
    expected = _reference(model, inputs, 12)
    selected = _selected_batches(monkeypatch)
    got = static_decode.generate_static(model, inputs, 12)
    assert got.shape[1] < 12  # stopped early: every row had finished
    assert got.tolist() == expected[:, : got.shape[1]].tolist()
    assert (expected[:, got.shape[1]:] == model.generation_config.pad_token_id).all()
    assert selected == [1]  # row 1 left the batch once it had finished; row 0 decoded on alone


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_batch_shrunk_twice_gives_generates_tokens(family, monkeypatch):
    """Four left-padded rows, V²Drop on: rows 0 and 1 end first, then row 2, row 3 runs on, so
    4 -> 2 -> 1 rows decode; the kept rows' caches, stage masks and M-RoPE positions follow them."""
    model = models.model(family, num_layers=NUM_LAYERS)
    questions = ["Hi", "Describe.", "What happens in this long clip here?", "Why?"]
    inputs = models.batch(family, [models.Sample(q, models.Visual("video", (2, 8, 8))) for q in questions])
    v2drop.enable(model, v2drop.Schedule.for_retention(NUM_LAYERS, 0.25))
    free_run = _reference(model, inputs, 12)
    plans = [[a, b, c, None] for a in range(1, 6) for b in range(1, 6) for c in range(max(a, b) + 1, 11)]
    model.generation_config.eos_token_id = _end_tokens_for(free_run, plans)
    expected = _reference(model, inputs, 12)
    selected = _selected_batches(monkeypatch)
    got = static_decode.generate_static(model, inputs, 12)
    assert got.tolist() == expected.tolist()
    assert selected == [2, 1]  # rows 0 and 1 left together once both had ended, then row 2


def test_each_stage_cache_is_sized_to_its_own_prefill_plus_new_tokens():
    model, inputs = _setup("qwen2_5_vl", dropping=True)
    text_model = model.model.language_model
    first, dynamic, positions = static_decode._prefill(model, text_model, inputs)
    lengths = [layer.keys.shape[2] for layer in dynamic.layers]
    state = stage_cache.static_state(model, text_model, dynamic, positions, inputs["attention_mask"], 5)
    assert [layer.max_cache_len for layer in state.cache.layers] == [n + 5 for n in lengths]
    assert lengths[-1] < lengths[0]  # later stages hold fewer tokens after the drops
    schedule = v2drop.Schedule.for_retention(NUM_LAYERS, 0.25)
    assert state.starts == [0, *schedule.layers]
    assert [v.shape[1] for v in state.valid] == [lengths[s] + 5 for s in state.starts]


@pytest.mark.parametrize("dropping", [False, True], ids=["stock", "v2drop"])
def test_static_step_asks_the_device_nothing(dropping):
    from bench.op_counts import OpCounter

    model, inputs = _setup("qwen2_5_vl", dropping)
    text_model = model.model.language_model
    first, dynamic, positions = static_decode._prefill(model, text_model, inputs)
    state = stage_cache.static_state(model, text_model, dynamic, positions, inputs["attention_mask"], 4)
    step = static_decode.EagerStep(model, text_model, state)
    step(first, 0)
    with torch.no_grad(), OpCounter() as counter:
        step(first, 1)
    assert counter.syncs == 0  # capturable: no host reads
    for layer, prefill in [(state.cache.layers[0], dynamic.layers[0]), (state.cache.layers[-1], dynamic.layers[-1])]:
        length = prefill.keys.shape[2]  # steps 0 and 1 wrote the two slots after the prompt, and no further
        written = layer.keys[:, :, length:].abs().sum(dim=(0, 1, 3)) > 0
        assert written.tolist() == [True, True, False, False]


@pytest.mark.slow
def test_the_compiled_step_gives_generates_tokens_with_one_graph_for_every_cache_length():
    """`compile=True` (torch.compile of the step, for the GPU) on CPU: the same greedy tokens as
    generate(), V²Drop on, for two calls whose prompts and cache lengths differ, with one compiled
    graph for both (the lengths are dynamic; each batch size compiles once)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # process-wide: earlier tests' compiles (bench_model's, above) count there too
    model = models.model("qwen2_5_vl", num_layers=4)  # compile time grows with the layers
    v2drop.enable(model, v2drop.Schedule.for_retention(4, 0.25))
    visual = models.Visual("video", (2, 8, 8))
    graphs = []
    for questions in (QUESTIONS, ["Hi", "Why is the sky blue today, in this clip, and not green?"]):
        inputs = models.batch("qwen2_5_vl", [models.Sample(q, visual) for q in questions])
        expected = _reference(model, inputs, 6)
        assert static_decode.generate_static(model, inputs, 6, compile=True).tolist() == expected.tolist()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] == 1, graphs


def test_the_compiled_step_attends_to_each_cache_as_it_is(monkeypatch):
    """What torch.compile traces of the step (a recording backend, no compiler): every attention
    call reads its layer's cache buffers themselves. transformers' sdpa under compile would expand
    the cache `num_key_value_groups` times (a copy of every layer's whole cache, every step); the
    tokens are generate()'s either way."""
    graphs: list[torch.fx.GraphModule] = []

    def record(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    family = "llava_onevision"  # the Qwen2 language model (1-D RoPE); the compiled-tokens test above is Qwen2.5-VL's
    model = models.model(family, num_layers=4)
    assert model.config.get_text_config().num_attention_heads > model.config.get_text_config().num_key_value_heads
    v2drop.enable(model, v2drop.Schedule.for_retention(4, 0.25))
    inputs = models.batch(family, [models.Sample(q, models.Visual("video", (2, 0, 0))) for q in QUESTIONS])
    monkeypatch.setattr(static_decode, "compiled_decode_step",
                        lambda: torch.compile(static_decode.decode_step, backend=record, dynamic=True))
    assert static_decode.generate_static(model, inputs, 4, compile=True).tolist() == _reference(model, inputs, 4).tolist()
    [graph] = graphs
    attention = [n for n in graph.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(attention) == 4
    for call in attention:
        key, value = call.args[1:3]
        assert key.op == value.op == "placeholder", (key.format_node(), value.format_node())
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # put back after decoding
