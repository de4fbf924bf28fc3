"""The V²Drop benchmark runs end to end at toy sizes and reports what it claims to report.

It is a script, not a timed test: nothing here looks at how fast anything was, only that the
command a GPU session will run works and that its table holds the right counts.
"""

from __future__ import annotations

import json

import pytest

import v2drop
from bench import bench_v2drop

TOY = ["--num-layers", "8", "--hidden-size", "64", "--intermediate-size", "128", "--grid", "2", "8", "8",
       "--new-tokens", "2", "--repeats", "1", "--no-memory-subprocess"]


@pytest.mark.parametrize("kernel", [
    pytest.param(["--attn", "sdpa"], id="sdpa-float32"),
    pytest.param(["--attn", "eager", "--dtype", "bfloat16"], id="eager-bfloat16"),
])
def test_benchmark_writes_side_by_side_ratios(tmp_path, kernel):
    bench_v2drop.main([*TOY, *kernel, "--device", "cpu", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "v2drop-cpu.json").read_text())
    assert (tmp_path / "v2drop-cpu.md").read_text().startswith("# V²Drop benchmark")

    schedule = v2drop.Schedule.for_retention(num_layers=8, retention=0.25)
    full, dropped, rand = (report["variants"][v] for v in ("full", "v2drop", "random"))
    visual = 2 * 8 * 8 // 4
    assert dropped["visual_tokens_per_layer"] == schedule.tokens_per_layer(visual, 8)
    assert rand["visual_tokens_per_layer"] == dropped["visual_tokens_per_layer"]
    assert full["prefill_time_ratio"] == 1.0 and full["retention"] == 1.0
    assert dropped["retention"] == pytest.approx(sum(dropped["visual_tokens_per_layer"]) / (8 * visual))
    assert 0 < dropped["prefill_flop_ratio"] < 1
    assert dropped["kv_cache_bytes"] < full["kv_cache_bytes"]
    assert report["weights"].startswith("random")
    assert report["args"]["attn"] == kernel[1]
