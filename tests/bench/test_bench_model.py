"""The whole-model benchmark runs end to end at toy size and reports what it claims to report.

Nothing here looks at how fast anything was; it checks that the command a GPU session will run
works, and that its table holds every variant x batch x new-token row and the right counts.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import v2drop
from bench import bench_model, model_report
from bench.model_setup import VARIANTS, build_model
from v2drop.memory import ModelShape, clip_bytes, clips_per_call

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
        assert row["batch_chosen_by"] == "fixed"
        # decode leaves out the engine's own prefill (its first token's logits), not the forward's
        generate_ms = (row["total_ms_per_clip"] - row["vision_ms_per_clip"]) * row["batch"]
        engine_prefill_ms = row["engine_prefill_ms_per_clip"] * row["batch"]
        assert 0 < engine_prefill_ms < generate_ms
        assert row["decode_ms_per_step"] == pytest.approx((generate_ms - engine_prefill_ms) / (new_tokens - 1))
    assert report["auto_batch"] is None
    rows = {(v, b, n): r for (v, e, b, n), r in all_rows.items() if e == "dynamic"}
    for batch in (1, 2):
        assert rows["v2drop", batch, 3]["kv_cache_bytes"] < rows["stock", batch, 3]["kv_cache_bytes"]
        assert rows["stock", batch, 3]["kv_cache_bytes"] == batch * rows["stock", 1, 3]["kv_cache_bytes"]

    assert report["visual_tokens"] == 2 * 8 * 12 // 4
    assert 0 < report["prefill_flop_ratio"] < 1
    counts = report["decode_step_counts"]
    assert counts["v2drop"]["syncs"] <= counts["stock"]["syncs"]
    assert counts["v2drop"]["op_calls"] <= 1.02 * counts["stock"]["op_calls"]
    static = report["static_step_counts"]  # what a captured graph replays: no sync, and kernels to count
    assert static["stock"]["syncs"] == static["v2drop"]["syncs"] == 0
    assert 0 < static["stock"]["kernel_calls"] < static["stock"]["op_calls"]
    for variant in VARIANTS:  # Qwen2.5-VL-7B-Instruct's repetition penalty (the step's only scatter_, lt and div)
        assert {op: static[variant]["by_op"].get(op) for op in ("aten.scatter_", "aten.lt", "aten.div")} == \
            {"aten.scatter_": 1, "aten.lt": 1, "aten.div": 1}, variant
    stages = len(report["schedule"]["layers"]) + 1  # V²Drop: a key mask per stage, ~5 kernels each (index_fill_, mask)
    assert 0 < static["v2drop"]["kernel_calls"] - static["stock"]["kernel_calls"] <= 5 * (stages - 1)
    prefill = report["prefill_counts"]
    assert prefill["v2drop"]["syncs"] <= prefill["stock"]["syncs"] + 1 and prefill["stock"]["op_calls"] > 0
    for variant, fewer in report["static_prefill_counts"].items():  # norms, rotary, projections: v2drop.kernels
        assert fewer["kernel_calls"] < 0.8 * prefill[variant]["kernel_calls"], variant
    profile = report["prefill_profile"]  # CPU: wall times only, and nothing recorded (no CUDA graphs)
    assert set(profile) == {"stock/eager", "stock/replayed", "v2drop/eager", "v2drop/replayed"}
    assert all(p["wall_ms"] > 0 and "kernel_ms" not in p for p in profile.values())
    assert profile["stock/replayed"]["replays"] == profile["v2drop/replayed"]["replays"] == 0
    assert "| v2drop/replayed |" in (tmp_path / "model-cpu.md").read_text()
    vision_batch1 = report["vision_batch1"]  # CPU: no kernel profile ("top")
    assert set(vision_batch1) == {"stock_loop_ms", "batched_unfused_ms", "batched_ms", "flops_per_clip",
                                  "batched_tflop_per_s"}
    tower = build_model(bench_model.parse_args(TOY))[0].model.visual
    linear = lambda module: sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    patches = 2 * 8 * 12  # each is embedded and meets every block's linear layers once; the merger one per 4
    weights = tower.patch_embed.proj.weight.numel() + linear(tower.blocks) + linear(tower.merger) // 4
    assert 2 * patches * weights <= vision_batch1["flops_per_clip"] <= 1.5 * 2 * patches * weights  # + attention
    assert vision_batch1["batched_tflop_per_s"] == pytest.approx(vision_batch1["flops_per_clip"] / vision_batch1["batched_ms"] / 1e9)
    names = [t["target"] for t in report["targets"]]
    assert any(n.startswith("whole model with V²Drop, best batch") for n in names)  # no auto rows: fixed batches
    assert any(n.startswith("clips/s V²Drop / stock at batch 2") for n in names)
    assert any(n.startswith("peak memory") for n in names)
    assert all(set(t) == {"target", "measured", "goal", "met", "off_by"} for t in report["targets"])


def test_a_batch_out_of_memory_is_named_in_the_report_and_the_run_goes_on(tmp_path, monkeypatch):
    real = bench_model.measure_batch

    def out_of_memory_at_2(model, tokenizer, args, schedule, batch, *rest):
        if batch == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(model, tokenizer, args, schedule, batch, *rest)

    monkeypatch.setattr(bench_model, "measure_batch", out_of_memory_at_2)
    toy = [*TOY[:TOY.index("--batch-sizes")], "--batch-sizes", "2", "1", "--device", "cpu"]
    report = bench_model.main([*toy, "--out-dir", str(tmp_path)])
    assert {r["batch"] for r in report["rows"]} == {1}
    assert report["failed_batches"] == [{"batch": 2, "variants": ["stock", "v2drop"],
                                         "error": "batch 2 stock/v2drop: CUDA out of memory. Tried to allocate 9.00 GiB"}]
    assert "Out of memory, not measured: batch 2" in (tmp_path / "model-cpu.md").read_text()
    partial = (tmp_path / "model-cpu-partial.md").read_text()  # written after each batch size
    assert partial.startswith("| variant | engine | batch |") and "| stock | static | 1 |" in partial


def test_engines_limited_to_one_batch_run_there_beside_the_static_one(tmp_path, monkeypatch):
    """`--engines static static-unfused@2 compiled@2`: the static step with transformers' own norms
    and rotary, and the step through torch.compile, only at batch 2 (the GPU run's comparisons, one
    compile per batch size). float32 on CPU: every engine gives the dynamic engine's tokens; the
    report sets each beside `static`, and the targets read the engine run at every batch."""
    from v2drop import static_decode

    monkeypatch.setattr(static_decode, "compiled_decode_step",  # traced by dynamo, not compiled by inductor
                        lambda: torch.compile(static_decode.decode_step, backend="eager", dynamic=True))
    toy = [*TOY[:TOY.index("--batch-sizes")], "--batch-sizes", "1", "2", "--new-tokens", "3", "--repeats", "1", "--device", "cpu"]
    toy[toy.index("--num-layers") + 1] = "4"
    report = bench_model.main([*toy, "--engines", "dynamic", "static", "static-unfused@2", "compiled@2",
                               "--out-dir", str(tmp_path)])
    rows = {(r["variant"], r["engine"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == ({(v, e, b) for v in ("stock", "v2drop") for e in ("dynamic", "static") for b in (1, 2)}
                         | {(v, e, 2) for v in ("stock", "v2drop") for e in ("static-unfused", "compiled")})
    assert all(r["tokens_equal_dynamic"] == 1.0 for r in rows.values())
    assert all(t["target"].endswith("[static]") for t in report["targets"])  # compiled ran at batch 2 only
    table = (tmp_path / "model-cpu.md").read_text().splitlines()
    for title in ("Static step, fused RMSNorms", "Static step, eager kernels vs the step through torch.compile"):
        [line] = [line for line in table if line.startswith(title)]
        assert "stock batch 2 (3 tokens)" in line and "v2drop batch 2 (3 tokens)" in line and "batch 1 (" not in line


def test_the_compiled_engine_gives_the_dynamic_engines_tokens_and_the_targets(tmp_path, monkeypatch):
    """`--engines ... compiled` (planned for the GPU) at toy size, 4 layers: traced by dynamo but not
    compiled by inductor here (the step's inductor compile is tests/v2drop/test_static_decode.py's)."""
    from v2drop import static_decode

    monkeypatch.setattr(static_decode, "compiled_decode_step",
                        lambda: torch.compile(static_decode.decode_step, backend="eager", dynamic=True))
    toy = [*TOY[:TOY.index("--batch-sizes")], "--batch-sizes", "2", "--new-tokens", "3", "--repeats", "1", "--device", "cpu"]
    toy[toy.index("--num-layers") + 1] = "4"
    report = bench_model.main([*toy, "--engines", "dynamic", "compiled", "--out-dir", str(tmp_path)])
    rows = {(r["variant"], r["engine"]): r for r in report["rows"]}
    assert set(rows) == {(v, e) for v in ("stock", "v2drop") for e in ("dynamic", "compiled")}
    assert all(rows[v, "compiled"]["tokens_equal_dynamic"] == 1.0 for v in ("stock", "v2drop"))
    assert all(t["target"].endswith("[compiled]") for t in report["targets"])  # read from the fastest engine


def test_the_capture_check_runs_each_limited_engine_at_its_own_batch(monkeypatch):
    """On CUDA, check_capture compares captured and uncaptured tokens per engine before the timed
    rows. An ENGINE@BATCH is checked at its batch, so a compiled step compiles for the batch its
    rows reuse; the others at batch 2. The GPU-only path, run here with the engine call recorded."""
    from types import SimpleNamespace

    from bench import model_checks

    calls = []

    def record(model, inputs, new_tokens, *, capture, stop_check_every, **kwargs):
        calls.append((inputs["input_ids"].shape[0], tuple(sorted(kwargs.items())), capture))
        return torch.zeros(inputs["input_ids"].shape[0], new_tokens, dtype=torch.long)

    monkeypatch.setattr(model_checks, "static_decode", SimpleNamespace(generate_static=record))  # its calls only
    toy = [*TOY[:TOY.index("--batch-sizes")], "--batch-sizes", "16", "1", "--device", "cpu"]
    toy[toy.index("--num-layers") + 1] = "4"
    args = bench_model.parse_args([*toy, "--engines", "dynamic", "static", "static-unfused@16", "compiled@16"])
    args.capture = True
    model, tokenizer = build_model(args)
    assert model_checks.check_capture(model, tokenizer, args, v2drop.Schedule.for_retention(4, 0.25)) is None
    checked = {(batch, kwargs) for batch, kwargs, _ in calls}
    assert checked == {(2, ()), (16, (("fused_kernels", False),)), (16, (("compile", True),))}
    assert len(calls) == 2 * 2 * len(checked)  # each variant, uncaptured and captured
    assert {capture for *_, capture in calls} == {False, True}

    # a compile that fails on the GPU costs the run that engine only: the others stay captured
    def compile_fails(model, inputs, new_tokens, *, capture, stop_check_every, **kwargs):
        if kwargs.get("compile"):
            raise RuntimeError("inductor: no kernel for this shape")
        return record(model, inputs, new_tokens, capture=capture, stop_check_every=stop_check_every, **kwargs)

    monkeypatch.setattr(model_checks, "static_decode", SimpleNamespace(generate_static=compile_fails))
    why = model_checks.check_capture(model, tokenizer, args, v2drop.Schedule.for_retention(4, 0.25))
    assert why == "compiled: RuntimeError: inductor: no kernel for this shape"
    assert args.capture and args.engines == ["dynamic", "static", "static-unfused@16"]


# Budget for --batch-sizes auto at TOY's shapes: 2.5 stock clips (757,248 bytes each in float32, 3
# new tokens), so stock gets 2 clips per call and V²Drop, whose cache is smaller (608,256), 3.
AUTO_BUDGET_GIB = 0.00177


def test_auto_batch_is_the_memory_models_choice_per_variant(tmp_path):
    argv = [*TOY[:TOY.index("--batch-sizes")], "--batch-sizes", "1", "auto", "--new-tokens", "2", "3", "--repeats", "1",
            "--device", "cpu", "--engines", "static", "--memory-budget-gib", str(AUTO_BUDGET_GIB), "--out-dir", str(tmp_path)]
    report = bench_model.main(argv)

    # What v2drop.memory says for this clip, computed here from the model's config and the schedule
    args = bench_model.parse_args(argv)
    model, _ = build_model(args)
    shape = ModelShape.from_config(model.config, torch.float32)
    schedule = v2drop.Schedule.for_retention(8, 0.25)
    visual = 2 * 8 * 12 // 4
    auto = report["auto_batch"]
    assert auto["visual_tokens"] == visual and auto["prompt_tokens"] > visual
    budget = int(AUTO_BUDGET_GIB * 2**30)
    assert auto["budget_bytes"] == budget
    expected = {}
    for variant, sched in (("stock", None), ("v2drop", schedule)):
        per_clip = clip_bytes(shape, sched, auto["prompt_tokens"] - visual, visual, visual * 4, 3)  # the longest count
        assert auto["clip_bytes"][variant] == per_clip
        expected[variant] = clips_per_call(budget, per_clip, bench_model.MAX_AUTO_BATCH)
    assert auto["batch"] == expected
    assert expected["v2drop"] > expected["stock"] > 1  # the budget tells the variants apart

    rows = {(r["variant"], r["batch"], r["batch_chosen_by"]) for r in report["rows"]}
    assert rows == {("stock", 1, "fixed"), ("v2drop", 1, "fixed"),
                    ("stock", expected["stock"], "engine"), ("v2drop", expected["v2drop"], "engine")}
    by = {(r["variant"], r["batch_chosen_by"]): r for r in report["rows"] if r["new_tokens"] == 3}
    targets = {t["target"]: t for t in report["targets"]}
    whole = targets[f"whole model with V²Drop at the engine's batch ({expected['v2drop']}), ms/clip (3 tokens) [static]"]
    assert whole["measured"] == by["v2drop", "engine"]["total_ms_per_clip"]
    ratio = targets[f"clips/s V²Drop / stock, each at the engine's batch ({expected['v2drop']} vs {expected['stock']}) [static]"]
    assert ratio["measured"] == pytest.approx(by["v2drop", "engine"]["clips_per_s"] / by["stock", "engine"]["clips_per_s"])
    assert "prefill time ratio at batch 1 [static]" in targets  # the fixed-batch targets stay on fixed rows

    table = (tmp_path / "model-cpu.md").read_text()
    assert f"| v2drop | static | {expected['v2drop']} (auto) | 3 |" in table
    assert f"| stock | static | {expected['stock']} (auto) | 3 |" in table
    assert "| stock | static | 1 | 3 |" in table
    assert "Rows marked (auto)" in table


def test_fixed_rows_alone_keep_the_best_batch_targets():
    """The fallback from auto rows: the same rows without them give today's targets."""
    rows = [dict(variant=v, engine="static", batch=b, batch_chosen_by=by, new_tokens=4, total_ms_per_clip=ms,
                 clips_per_s=1e3 / ms, vision_ms_per_clip=1.0, prefill_ms_per_clip=1.0, decode_ms_per_step=1.0,
                 peak_cuda_bytes=None, kv_cache_bytes=1)
            for v, b, by, ms in (("stock", 4, "fixed", 40.0), ("v2drop", 4, "fixed", 30.0),
                                 ("stock", 8, "engine", 35.0), ("v2drop", 12, "engine", 20.0))]
    with_auto = {t["target"]: t["measured"] for t in model_report.targets(rows, 0.5)}
    assert with_auto["clips/s V²Drop / stock, each at the engine's batch (12 vs 8) [static]"] == pytest.approx(35 / 20)
    fixed = {t["target"]: t["measured"] for t in model_report.targets([r for r in rows if r["batch"] == 4], 0.5)}
    assert fixed["clips/s V²Drop / stock at batch 4 [static]"] == pytest.approx(40 / 30)
    assert fixed["whole model with V²Drop, best batch, ms/clip (4 tokens) [static]"] == 30.0
    replayed = "prefill time ratio at batch 1, replayed from CUDA graphs (v2drop.prefill_graphs) [static]"
    assert replayed not in fixed
    profile = {"stock/replayed": {"wall_ms": 50.0, "replays": 3}, "v2drop/replayed": {"wall_ms": 15.0, "replays": 3}}
    assert {t["target"]: t["measured"] for t in model_report.targets(rows, 0.5, profile)}[replayed] == pytest.approx(0.3)
    profile["v2drop/replayed"]["replays"] = 0  # not recorded: no such figure
    assert replayed not in {t["target"] for t in model_report.targets(rows, 0.5, profile)}


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "1", "auto", "--device", "cpu"], "needs --memory-budget-gib"),
    (["--batch-sizes", "0"], "positive integer or 'auto'"),
    (["--batch-sizes", "big"], "positive integer or 'auto'"),
    (["--batch-sizes", "auto", "--device", "cpu", "--memory-budget-gib", "0"], "--memory-budget-gib must be > 0"),
    (["--engines", "static", "fast"], "unknown engine 'fast'"),
    (["--engines", "static", "compiled@0"], "must be a positive integer"),
    (["--engines", "static", "compiled@auto"], "must be a positive integer"),
    (["--batch-sizes", "1", "--engines", "static", "compiled@16"], "compiled@16: its batch is not in --batch-sizes"),
    (["--batch-sizes", "16", "--engines", "compiled@16"], "needs one engine without '@BATCH'"),
    (["--batch-sizes", "16", "--engines", "static", "static@16"], "names an engine twice"),
])
def test_bad_batch_and_engine_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_model.parse_args(argv)
    assert message in capsys.readouterr().err



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
    assert {"bench.model_setup", "bench.model_checks", "bench.model_report", "bench.engine_batch", "v2drop",
            "vlm.tiny", "workers.call_size"} <= seen
    assert not outside & {"ray", "pyarrow", "pandas", "pipeline"}, sorted(outside)
    # From workers only the call sizing ('auto' batches) and its settings, torch-only modules whose
    # own imports the walk above followed; the actor and its Ray-facing code stay out
    assert {m for m in seen if m.split(".")[0] == "workers"} <= {"workers", "workers.call_size", "workers.settings"}
