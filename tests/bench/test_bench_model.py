"""The whole-model benchmark runs end to end at toy size and reports what it claims to report.

Nothing here looks at how fast anything was; it checks that the command a GPU session will run
works, and that its table holds every variant x batch x new-token row and the right counts.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from bench import bench_model

TOY = ["--num-layers", "8", "--hidden-size", "64", "--intermediate-size", "128", "--vision-depth", "2",
       "--vision-hidden-size", "32", "--grid", "2", "8", "12", "--batch-sizes", "1", "2",
       "--new-tokens", "3", "--repeats", "1", "--device", "cpu"]


def test_whole_model_benchmark_writes_every_row_and_target(tmp_path):
    bench_model.main([*TOY, "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "model-cpu.json").read_text())
    assert (tmp_path / "model-cpu.md").read_text().startswith("# Whole-model benchmark (CPU")

    all_rows = {(r["variant"], r["engine"], r["batch"], r["new_tokens"]): r for r in report["rows"]}
    assert set(all_rows) == {(v, e, b, n) for v in ("stock", "v2drop") for e in ("dynamic", "static")
                             for b in (1, 2) for n in (3,)}
    assert report["static_step_captured"] is False and report["capture_error"] is None  # CPU: uncaptured
    for (_variant, _engine, _batch, new_tokens), row in all_rows.items():
        assert row["clips_per_s"] == pytest.approx(1e3 / row["total_ms_per_clip"])
        assert row["output_tokens_per_s"] == pytest.approx(new_tokens * row["clips_per_s"])
        assert row["total_ms_per_clip"] > row["vision_ms_per_clip"] > 0
        assert row["peak_cuda_bytes"] is None  # CPU: the KV cache is the memory figure
        assert row["tokens_equal_dynamic"] == 1.0  # float32 on CPU: the static engine is exact
    rows = {(v, b, n): r for (v, e, b, n), r in all_rows.items() if e == "dynamic"}
    for batch in (1, 2):
        assert rows["v2drop", batch, 3]["kv_cache_bytes"] < rows["stock", batch, 3]["kv_cache_bytes"]
        assert rows["stock", batch, 3]["kv_cache_bytes"] == batch * rows["stock", 1, 3]["kv_cache_bytes"]

    assert report["visual_tokens"] == 2 * 8 * 12 // 4
    assert 0 < report["prefill_flop_ratio"] < 1
    counts = report["decode_step_counts"]
    assert counts["v2drop"]["syncs"] <= counts["stock"]["syncs"]
    assert counts["v2drop"]["op_calls"] <= 1.02 * counts["stock"]["op_calls"]
    prefill = report["prefill_counts"]
    assert prefill["v2drop"]["syncs"] <= prefill["stock"]["syncs"] + 1 and prefill["stock"]["op_calls"] > 0
    assert report["prefill_profile"] == {}  # CPU: no kernel profile
    assert set(report["vision_batch1"]) == {"stock_loop_ms", "batched_ms"}
    names = [t["target"] for t in report["targets"]]
    assert any(n.startswith("whole model with V²Drop") for n in names)
    assert any(n.startswith("peak memory") for n in names)
    assert all(set(t) == {"target", "measured", "goal", "met", "off_by"} for t in report["targets"])



REPO = Path(__file__).resolve().parents[2]
OWN_PACKAGES = ("bench", "v2drop", "vlm", "pipeline", "workers")


def _module_level_imports(module: str) -> set[str]:
    """Modules `module` imports when it is imported: its top-level import statements (those inside
    functions run only when called), `if TYPE_CHECKING:` blocks left out."""
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
            if isinstance(inner, ast.Import):
                found.update(alias.name for alias in inner.names)
            elif isinstance(inner, ast.ImportFrom) and inner.module and not inner.level:
                found.add(inner.module)
                found.update(f"{inner.module}.{alias.name}" for alias in inner.names)
    return found


def test_the_gpu_command_needs_only_torch_and_transformers():
    """The GPU box runs `python -m bench.bench_model` with torch + transformers and this repository:
    nothing it imports at module level, followed through this repository's modules, is Ray,
    pyarrow or the pipeline (an import inside a function runs only when called)."""
    seen, todo, outside = set(), ["bench.bench_model"], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _module_level_imports(module):
            top = name.split(".")[0]
            is_file = (REPO / (name.replace(".", "/") + ".py")).exists() or (REPO / name.replace(".", "/")).is_dir()
            if top in OWN_PACKAGES and is_file:
                todo.append(name)
            outside.add(top)
    assert {"bench.model_setup", "bench.model_checks", "bench.model_report", "v2drop", "vlm.tiny"} <= seen
    assert not outside & {"ray", "pyarrow", "pandas", "pipeline", "workers"}, sorted(outside)
