"""bench_guard's arithmetic on hand-made rows: the shadow's cost over each item's own."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from bench import bench_guard


def test_shadow_costs_divide_the_shadow_by_the_items_own_time_and_flops() -> None:
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ok = pa.Table.from_pylist([
        {"clip_id": clip, "started_at": at, "finished_at": at, "worker_host": "h", "inputs_ms": 20.0, "prefill_ms": 100.0,
         "generate_ms": 300.0, "visual_tokens_per_stage": [8, 2], "flops_full": 40.0, "flops_dropped": 10.0,
         "decode_ms": 5.0, "shadow_ms": shadow_ms, "shadow_flops": shadow_flops, "shadow_lcs_ratio": lcs}
        for clip, shadow_ms, shadow_flops, lcs in (("a", 300.0, 50.0, 1.0), ("b", None, None, None), ("c", 300.0, 50.0, 0.5))
    ])
    costs = bench_guard.shadow_costs(ok)
    # one generate call of 300 ms for three items: 100 ms each; the shadow took 300 ms per item
    assert (costs["items_shadowed"], costs["items"]) == (2, 3)
    assert costs["model_ms_per_item"] == pytest.approx(100.0) and costs["time_ratio"] == pytest.approx(3.0)
    assert costs["flop_ratio"] == pytest.approx(5.0) and costs["agreement_mean"] == pytest.approx(0.75)
    report = {"args": {"model": "tiny", "num_frames": 4, "max_pixels": 12544, "max_new_tokens": 4, "repeats": 1},
              "runs": {"none": [{"wall_s": 10.0}], "all": [{"wall_s": 12.0, **costs}]}}
    table = bench_guard.markdown(report)
    assert "| 0.02 | 6.0 % | 10.0 % |" in table and "| 0.1 | 30.0 % | 50.0 % |" in table
