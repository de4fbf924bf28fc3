"""Small prefills replayed from a recording (v2drop.prefill_graphs) give the eager prefill's tokens,
logits, cache and stats, stock and V²Drop, for the three families, including for new inputs of a
recorded shape; what cannot be recorded stays eager.

CUDA graphs need a GPU, so the recorder here is `Rerun`: its replay runs the recorded closure again
and writes the results into the recorded output tensors, which is what a CUDA graph replay does
(kernels reading the fixed input buffers, writing the fixed outputs). Everything around the
recording (buffers, keys, the cache copied out, the bit check, eviction, fallbacks) is the engine's
own code; `bench.model_checks.prefill_profile` records real CUDA graphs on a GPU. What a CUDA
recording cannot hold is counted here instead: the recorded prefill reads nothing back from the
device and makes no tensor from host data.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import v2drop
from bench.op_counts import OpCounter
from v2drop.prefill_graphs import PrefillGraphs, tensors_in
from vlm import testing as models

NUM_LAYERS = 8
NEW_TOKENS = 6


class Rerun:
    """A CUDA graph's replay semantics on CPU (see the module docstring)."""

    device_type = "cpu"

    def __init__(self, closure) -> None:
        self.closure = closure
        self.out = closure()

    def replay(self):
        for recorded, new in zip(tensors_in(self.out), tensors_in(self.closure())):
            recorded.copy_(new)
        return self.out


class Broken(Rerun):
    """A recording whose replay writes nothing new: the bit check must catch it."""

    def replay(self):
        for recorded in tensors_in(self.out):
            recorded.zero_()
        return self.out


class Watched(Rerun):
    """Rerun, watching the recording for what a CUDA graph cannot hold: host-device syncs (they fail
    a recording) and tensors made from host data that hold any (their copy would be frozen into it).
    DynamicCache makes its empty start tensors from `[]`, which copies nothing."""

    recordings: list[tuple[int, list[int]]] = []  # (syncs, sizes of tensors made from host data)

    def __init__(self, closure) -> None:
        with OpCounter() as counter, _HostTensors() as made:
            super().__init__(closure)
        Watched.recordings.append((counter.syncs, [n for n in made.sizes if n]))


class _HostTensors(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.lift_fresh.default:
            self.sizes.append(out.numel())
        return out


def _visual(family: str) -> models.Visual:
    return models.Visual("video", (2, 0, 0) if family == "llava_onevision" else (2, 8, 8))


def _inputs(family: str, rows: int = 1, seed: int = 0, question: str = "Describe.") -> dict:
    return models.batch(family, [models.Sample(question, _visual(family))] * rows, seed=seed)


def _generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


def _schedule(dropping: bool) -> v2drop.Schedule:
    return v2drop.Schedule.for_retention(NUM_LAYERS, 0.25) if dropping else v2drop.Schedule(layers=(), keep=())


@pytest.mark.parametrize("dropping", [False, True], ids=["stock", "v2drop"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_replayed_prefills_equal_eager_ones_for_new_inputs_of_the_shape(family, dropping):
    model = models.model(family, num_layers=NUM_LAYERS)
    calls = [_inputs(family, rows=2, seed=seed) for seed in (0, 1, 2)]  # same shapes, other pixels
    v2drop.enable(model, _schedule(dropping))
    eager = [_generate(model, inputs) for inputs in calls]
    eager_stats = v2drop.last_stats(model) if dropping else None
    graphs = PrefillGraphs(recorder=Rerun)
    v2drop.enable(model, _schedule(dropping), prefill_graphs=graphs)
    replayed = [_generate(model, inputs) for inputs in calls]
    assert graphs.failures == {}
    assert len(graphs.entries) == 1 and graphs.replays == 2  # recorded at the first call, replayed twice
    for (tokens, logits), (tokens_r, logits_r) in zip(eager, replayed):
        assert torch.equal(tokens, tokens_r) and torch.equal(logits, logits_r)
    assert not torch.equal(eager[0][1], eager[2][1])  # the pixels matter: a stale replay would show
    if dropping:
        assert v2drop.last_stats(model) == eager_stats


@pytest.mark.parametrize("dropping", [False, True], ids=["stock", "v2drop"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_a_recorded_prefill_reads_nothing_back_and_copies_nothing_in(family, dropping):
    model = models.model(family, num_layers=NUM_LAYERS)
    v2drop.enable(model, _schedule(dropping), prefill_graphs=PrefillGraphs(recorder=Watched))
    Watched.recordings.clear()
    _generate(model, _inputs(family))
    assert Watched.recordings == [(0, [])]


def test_the_stock_forward_replayed_equals_the_unpatched_model():
    model = models.model("qwen2_5_vl", num_layers=NUM_LAYERS)
    inputs = _inputs("qwen2_5_vl")
    stock = _generate(model, inputs)
    graphs = PrefillGraphs(recorder=Rerun)
    v2drop.enable(model, _schedule(False), prefill_graphs=graphs)
    for _ in range(2):
        tokens, logits = _generate(model, inputs)
        assert torch.equal(tokens, stock[0]) and torch.equal(logits, stock[1])
    assert graphs.replays == 1


@pytest.mark.parametrize("dropping", [False, True], ids=["stock", "v2drop"])
def test_padded_large_random_or_grad_prefills_stay_eager(dropping):
    model = models.model("qwen2_5_vl", num_layers=NUM_LAYERS)
    graphs = PrefillGraphs(recorder=Rerun, max_tokens=200)
    v2drop.enable(model, _schedule(dropping), prefill_graphs=graphs)
    padded = models.batch("qwen2_5_vl", [models.Sample(q, _visual("qwen2_5_vl"))
                                         for q in ("Describe.", "What happens in this long clip here?")])
    large = _inputs("qwen2_5_vl", rows=4)  # 4 x 77 token slots > 200
    for inputs in (padded, large):
        _generate(model, inputs)
    with torch.enable_grad():
        model(**_inputs("qwen2_5_vl"))
    if dropping:
        v2drop.enable(model, _schedule(True), scorer="random", prefill_graphs=graphs)
        _generate(model, _inputs("qwen2_5_vl"))
    assert len(graphs.entries) == 0


def test_a_replay_that_differs_leaves_the_shape_eager_and_says_why(caplog):
    model = models.model("qwen2_5_vl", num_layers=NUM_LAYERS)
    inputs = _inputs("qwen2_5_vl")
    v2drop.enable(model, _schedule(True))
    expected = _generate(model, inputs)
    graphs = PrefillGraphs(recorder=Broken)
    v2drop.enable(model, _schedule(True), prefill_graphs=graphs)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(_generate(model, inputs), expected))
    assert list(graphs.entries.values()) == [None] and graphs.replays == 0
    assert [why for why in graphs.failures.values()] == ["RuntimeError: the replayed prefill differs from the eager one"]
    assert "prefill not recorded" in caplog.text


def test_at_most_max_graphs_recordings_are_kept_the_oldest_goes():
    model = models.model("qwen2_5_vl", num_layers=NUM_LAYERS)
    graphs = PrefillGraphs(recorder=Rerun, max_graphs=1)
    v2drop.enable(model, _schedule(True), prefill_graphs=graphs)
    short, long = _inputs("qwen2_5_vl"), _inputs("qwen2_5_vl", question="Describe every person in this clip.")
    for inputs in (short, long, long):
        _generate(model, inputs)
    assert len(graphs.entries) == 1 and graphs.replays == 1
    (key,) = graphs.entries
    assert key[1].text == (int(long["attention_mask"].sum()) - 32,)  # the long prompt's RowCounts
