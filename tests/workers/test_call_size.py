"""workers.call_size: model calls hold as many rows as the memory budget allows (v2drop.memory),
and V²Drop's smaller cache gives larger calls from the same budget. A real tiny model on CPU with
an explicit budget (actors.memory_budget_gib), the rows' batch_id telling the calls apart."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.workers.test_model_stage import CAPTION, GREEDY, as_batch, clip_row, model_cfg
from workers.call_size import FIRST_CALL_ROWS
from workers.model_stage import VideoModelWorker
from workers.settings import ActorsConfig

CLIPS = [clip_row(f"c{i}", 4, 168, 168, seed=i) for i in range(8)]  # 72 visual tokens each


def call_sizes(worker: VideoModelWorker) -> list[int]:
    out = worker(as_batch(CLIPS))
    assert out["status"] == ["ok"] * len(CLIPS)
    return list(Counter(out["batch_id"]).values())  # rows per call, in call order


@pytest.fixture(scope="module")
def stock(cache_dir):
    return VideoModelWorker(model_cfg(retention=1.0, cache_dir=cache_dir), GREEDY, CAPTION, actors=ActorsConfig(memory_budget_gib=1.0))


@pytest.fixture(scope="module")
def dropping(cache_dir):
    return VideoModelWorker(model_cfg(retention=0.25, cache_dir=cache_dir), GREEDY, CAPTION, actors=ActorsConfig(memory_budget_gib=1.0))


def test_the_first_call_learns_the_row_size_and_later_calls_fill_the_budget(stock):
    stock.loaded.sizer.row_bytes = None
    assert call_sizes(stock)[0] == FIRST_CALL_ROWS
    row_bytes = stock.loaded.sizer.row_bytes
    assert row_bytes > 0
    assert stock.loaded.sizer.engine == GREEDY.engine() == "static"  # sized for the engine that decodes
    stock.loaded.sizer.budget_bytes = int(3.5 * row_bytes)  # 3 rows fit, 4 do not
    assert call_sizes(stock) == [3, 3, 2]


def test_v2drop_rows_are_smaller_so_its_calls_are_larger(stock, dropping):
    for worker in (stock, dropping):
        call_sizes(worker)  # learn
    assert dropping.loaded.sizer.row_bytes < stock.loaded.sizer.row_bytes
    budget = int(4.5 * stock.loaded.sizer.row_bytes)
    stock.loaded.sizer.budget_bytes = dropping.loaded.sizer.budget_bytes = budget
    stock_calls, dropped_calls = call_sizes(stock), call_sizes(dropping)
    assert max(stock_calls) == 4
    assert max(dropped_calls) > 4


def test_without_a_budget_on_cpu_one_call_takes_the_whole_batch(cache_dir):
    assert call_sizes(VideoModelWorker(model_cfg(cache_dir=cache_dir), GREEDY, CAPTION)) == [len(CLIPS)]


def test_a_sizer_learns_its_own_engines_row_bytes():
    """Long answers (20,000 new tokens): the static engine's two cache copies outweigh generate()'s
    MLP peak, so a dynamic-only call (sampling) gets smaller rows than a static one."""
    from tests.v2drop.test_memory import TEXT_TOKENS, seven_b
    from v2drop.memory import clip_bytes
    from workers.call_size import CallSizer

    rows = {}
    for engine in ("static", "dynamic"):
        sizer = CallSizer(seven_b(), None, engine, 20_000, 4, budget_bytes=100 * 2**30)
        sizer.learn([(TEXT_TOKENS + 2048, 2048)])
        assert sizer.row_bytes == clip_bytes(seven_b(), None, TEXT_TOKENS, 2048, 4 * 2048, 20_000, engine)
        rows[engine] = sizer.row_bytes
    assert rows["dynamic"] < rows["static"]
