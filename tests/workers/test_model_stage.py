"""workers.model_stage and workers.model_calls on CPU with tiny random-weight models (vlm.tiny), called directly (no Ray).

The model tests use the families' real processors (`vlm.processing.load_processor`), as production does.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

import v2drop
from pipeline.config import StorageConfig
from pipeline.storage import Storage
from workers import model_calls
from workers import model_stage as model_stage_module
from workers.generation import count_output_tokens
from workers.loading import ModelSourceError, resolve_model_source
from workers.model_inputs import build_inputs, clip_fps, decode_frames, expand_prompts
from workers.model_stage import VideoModelWorker
from workers.rows import MODEL_COLUMNS, GenResult, passthrough_row, result_row, rows_to_columns
from workers.settings import GenerationConfig, ModelConfig, PromptConfig

MAX_NEW_TOKENS = 6
CAPTION = PromptConfig(task="caption", caption="Describe this video.")
GREEDY = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)


def model_cfg(source: str = "tiny:qwen2_5_vl", retention: float = 1.0, cache_dir: str | None = None) -> ModelConfig:
    """A CPU model section: float32 and sdpa (the defaults are the GPU's bfloat16 and flash attention)."""
    return ModelConfig(source=source, dtype="float32", attn_implementation="sdpa", retention=retention,
                       cache_dir=cache_dir)


def clip_row(clip_id: str, num_frames: int, height: int, width: int, seed: int = 0) -> dict[str, Any]:
    """A decoded clip as the decode stage writes it: raw bytes + shape + dtype + timestamps."""
    frames = np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    return {
        "video_uri": f"/videos/{clip_id}.mp4",
        "clip_id": clip_id,
        "start_s": 0.0,
        "end_s": 2.0,
        "frames": frames.tobytes(),
        "frames_shape": np.array([num_frames, height, width, 3]),
        "frames_dtype": "uint8",
        "timestamps_s": np.arange(num_frames) * 0.5 + 0.25,
        "status": "ok",
        "error": None,
        "error_stage": None,
    }


def upstream_error_row(clip_id: str) -> dict[str, Any]:
    return {**clip_row(clip_id, 1, 28, 28), "frames": None, "frames_shape": None, "timestamps_s": None,
            "status": "error", "error": "decode: moov atom not found", "error_stage": "decode"}


def as_batch(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as the Arrow batch Ray Data hands the stage (numpy values as lists, as Arrow stores them)."""
    return pa.Table.from_pylist([{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in row.items()}
                                 for row in rows])


THREE_CLIPS = [clip_row("a", 4, 112, 112, 0), clip_row("b", 6, 84, 140, 1), clip_row("c", 2, 140, 84, 2)]


@pytest.fixture(scope="module")
def qwen(cache_dir: str) -> VideoModelWorker:
    return VideoModelWorker(model_cfg(cache_dir=cache_dir), GREEDY, CAPTION)


# -- pure functions ----------------------------------------------------------------------------


def test_decode_frames_names_the_column_when_bytes_do_not_fit_the_shape() -> None:
    row = {**clip_row("a", 2, 28, 28), "frames_shape": [3, 28, 28, 3]}
    with pytest.raises(ValueError, match=r"frames: 4704 bytes do not hold frames_shape \[3, 28, 28, 3\]"):
        decode_frames(row)
    assert decode_frames(clip_row("a", 2, 28, 28)).shape == (2, 28, 28, 3)


def test_clip_fps_is_the_sampling_rate_of_the_frames() -> None:
    assert clip_fps(clip_row("a", 5, 28, 28)) == pytest.approx(2.0)  # 0.5 s apart
    assert clip_fps({**clip_row("a", 4, 28, 28), "timestamps_s": [1.0]}) == pytest.approx(2.0)  # 4 frames / 2 s


def test_qa_prompts_are_configured_questions_then_the_rows_own_without_repeats() -> None:
    cfg = PromptConfig(task="qa", questions=["What happens?", "Who is there?"])
    row = {"questions": np.array(["Who is there?", "Where is it?"], dtype=object)}
    prompts = [prompt for _, prompt in expand_prompts([row], cfg)]
    assert prompts == ["What happens?", "Who is there?", "Where is it?"]
    # a manifest's blank question (one string or in a list) is none: prompt '' is the clip-level key
    assert [p for _, p in expand_prompts([{"questions": " "}, {"questions": ["", "Where?"]}], cfg)] == [
        "What happens?", "Who is there?", "What happens?", "Who is there?", "Where?"]


def test_output_tokens_stop_before_the_first_eos_or_pad() -> None:
    eos, pad = 9, 8
    new_tokens = torch.tensor([[5, 7, eos, pad], [5, 6, 4, 3], [eos, pad, pad, pad]])
    assert count_output_tokens(new_tokens, {eos, pad}) == [2, 4, 0]


def test_missing_local_path_error_names_it(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelSourceError, match=f"model path {missing} does not exist"):
        resolve_model_source(str(missing), revision=None, cache_dir=tmp_path, storage=None)


def test_uncached_hub_id_offline_says_what_to_do(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="model nobody/not-a-cached-model not found locally and the hub is "
                       "unreachable; use preset=offline or a local path"):
        resolve_model_source("nobody/not-a-cached-model", revision=None, cache_dir=tmp_path, storage=None)


def test_model_columns_are_one_list_that_every_row_and_the_schema_follow() -> None:
    from pipeline.schema import FILE_SCHEMA

    assert {f.name for f in dataclasses.fields(GenResult)} <= set(MODEL_COLUMNS)
    assert len(set(MODEL_COLUMNS)) == len(MODEL_COLUMNS)
    assert set(MODEL_COLUMNS) - set(FILE_SCHEMA.names) == {"peak_memory_bytes"}  # pipeline._model renames it
    stamp = {"model_id": "m", "started_at": "t0", "finished_at": "t1"}
    ok = result_row(THREE_CLIPS[0], "p", GenResult(output_text="x", prefill_ms=1.0), stamp)
    failed = result_row(THREE_CLIPS[0], "", GenResult(status="error", error="bad"), stamp)
    passed = passthrough_row(upstream_error_row("x"))
    for row in (ok, failed, passed):
        assert set(MODEL_COLUMNS) <= set(row) and "frames" not in row
    assert (ok["output_text"], ok["prefill_ms"], ok["error_stage"], ok["model_id"]) == ("x", 1.0, None, "m")
    assert (failed["status"], failed["error"], failed["error_stage"]) == ("error", "bad", "model")
    assert (passed["status"], passed["error_stage"], passed["model_id"], passed["prompt"]) == ("error", "decode", None, "")


def test_rows_to_columns_fills_missing_keys_in_first_seen_order() -> None:
    columns = rows_to_columns([{"a": 1, "b": 2}, {"c": 3, "a": 4}])
    assert columns == {"a": [1, 4], "b": [2, None], "c": [None, 3]}


def test_next_call_holds_whole_clips_within_the_memory_budget() -> None:
    a, b, c = ({"clip": name} for name in "abc")
    items = [(a, "q1"), (a, "q2"), (b, "q1"), (c, "q1"), (c, "q2")]
    assert model_calls.next_call(items, [0, 1, 2, 3, 4], chunk=3, rows=3, share=True) == [0, 1, 2]
    assert model_calls.next_call(items, [3, 4], chunk=3, rows=1, share=True) == [3, 4]  # always one whole clip
    assert model_calls.next_call(items, [0, 1, 2, 3, 4], chunk=3, rows=2, share=False) == [0, 1]


def test_tiny_source_resolves_to_random_weights(cache_dir: str) -> None:
    resolved = resolve_model_source("tiny:qwen2_5_vl", revision=None, cache_dir=cache_dir, storage=None)
    assert resolved.random_weights is True
    assert resolved.model_id == "tiny:qwen2_5_vl"
    assert (Path(resolved.path_or_id) / "config.json").is_file() and resolved.path_or_id.startswith(cache_dir)


class _FakeLoaded:
    """Stands in for LoadedModel where only the fallback logic is under test."""

    model = type("M", (), {"config": type("C", (), {"model_type": "qwen2_5_vl"})()})()
    processor = None
    sizer = None  # no memory budget
    inputs_device = None


def test_oom_halves_the_batch_and_a_failing_item_fails_alone(monkeypatch) -> None:
    calls: list[list[str]] = []
    failed_calls_memory: list[weakref.ref] = []  # what each failed call held, as its KV cache would be
    held_during_retries: list[bool] = []

    def fake_generate(model, processor, items, generation_cfg, inputs_ms):
        prompts = [prompt for _, prompt in items]
        calls.append(prompts)
        held_during_retries.append(any(ref() is not None for ref in failed_calls_memory))
        cache = torch.zeros(len(items), 64)
        failed_calls_memory.append(weakref.ref(cache))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if "bad" in prompts:
            raise RuntimeError("shape mismatch")
        return [GenResult(output_text=prompt) for prompt in prompts]

    monkeypatch.setattr(model_calls, "build_inputs", lambda processor, items, system, device: items)
    monkeypatch.setattr(model_calls, "timed_inputs", lambda model, make: (make(), 0.0))
    monkeypatch.setattr(model_calls, "generate_batch", fake_generate)
    items = [({}, p) for p in ("p0", "p1", "bad", "p3")]
    results = model_calls.run_items(_FakeLoaded(), items, None, GREEDY, chunk=4)
    assert [r.status for r in results] == ["ok", "ok", "error", "ok"]
    assert [r.output_text for r in results] == ["p0", "p1", None, "p3"]
    assert results[2].error == "RuntimeError: shape mismatch"
    assert calls == [["p0", "p1", "bad", "p3"], ["p0", "p1"], ["bad", "p3"], ["bad"], ["p3"]]
    assert held_during_retries == [False] * 5  # a retry starts with the failed call's memory freed
    # Each row says it came from a retry, the first cause kept; one id per failed call.
    reasons = [r.fallback_reason for r in results]
    assert reasons == ["OutOfMemoryError: batch halved"] * 2 + ["RuntimeError: retried item by item"] * 2
    failed_calls = {r.fallback_reason: r.fallback_batch_id for r in results}
    assert [r.fallback_batch_id for r in results] == [failed_calls[reason] for reason in reasons]
    assert len(set(failed_calls.values())) == 2
    assert len({r.batch_id for r in results if r.status == "ok"}) == 2  # calls [p0, p1] and [p3]


def test_a_failed_shared_call_is_retried_clip_by_clip_so_the_good_clips_still_share(monkeypatch) -> None:
    """Clips a, bad and c, 2 prompts each: a call with the bad clip fails; each clip is then
    retried alone with all its prompts (so c keeps one video prefill), the bad one item by item.
    An out-of-memory call is halved between clips, not through one (a's prompts stay together)."""
    a, bad, c = {"clip": "a"}, {"clip": "bad"}, {"clip": "c"}
    calls: list[list[str]] = []

    def fake_generate(loaded, items, system, generation_cfg):
        calls.append([f"{row['clip']}.{prompt}" for row, prompt in items])
        if len(items) == 6:
            raise torch.OutOfMemoryError("CUDA out of memory")
        if any(row is bad for row, _ in items):
            raise RuntimeError("too small")
        return [GenResult(output_text=prompt) for _, prompt in items]

    monkeypatch.setattr(model_calls, "generate_items", fake_generate)
    items = [(a, "q1"), (a, "q2"), (bad, "q1"), (bad, "q2"), (c, "q1"), (c, "q2")]
    results = model_calls.generate_with_fallback(_FakeLoaded(), items, None, GREEDY)
    assert calls == [["a.q1", "a.q2", "bad.q1", "bad.q2", "c.q1", "c.q2"], ["a.q1", "a.q2"],  # halved: 1 clip + 2
                     ["bad.q1", "bad.q2", "c.q1", "c.q2"], ["bad.q1", "bad.q2"], ["bad.q1"], ["bad.q2"], ["c.q1", "c.q2"]]
    assert [r.status for r in results] == ["ok", "ok", "error", "error", "ok", "ok"]
    assert [r.fallback_reason for r in results] == ["OutOfMemoryError: batch halved"] * 2 + [
        "RuntimeError: retried item by item"] * 2 + ["RuntimeError: retried clip by clip"] * 2
    assert model_calls.retry_parts(items, share=False) == ([[item] for item in items], "item")


# -- the real tiny models ------------------------------------------------------------------------


def test_caption_batch_of_three_clips(qwen: VideoModelWorker) -> None:
    out = qwen(as_batch(THREE_CLIPS))

    assert list(out["clip_id"]) == ["a", "b", "c"]
    assert "frames" not in out and set(MODEL_COLUMNS) <= set(out)
    assert {len(values) for values in out.values()} == {3}
    assert out["status"] == ["ok"] * 3 and out["error"] == [None] * 3
    assert all(text.strip() for text in out["output_text"])
    assert all(1 <= n <= MAX_NEW_TOKENS for n in out["output_tokens"])
    items = expand_prompts(THREE_CLIPS, CAPTION)
    inputs = build_inputs(qwen.loaded.processor, items)
    assert out["prompt_tokens"] == inputs["attention_mask"].sum(dim=1).tolist()
    video_pad = qwen.loaded.model.config.video_token_id
    assert out["visual_tokens_per_stage"] == [[int(n)] for n in (inputs["input_ids"] == video_pad).sum(dim=1)]
    assert out["retention_achieved"] == [1.0] * 3 and out["flops_dropped"] == out["flops_full"]
    assert out["model_id"] == ["tiny:qwen2_5_vl"] * 3 and out["model_random_weights"] == [True] * 3
    assert all(p > 0 for p in out["prefill_ms"]) and all(g >= p for g, p in zip(out["generate_ms"], out["prefill_ms"]))
    assert out["inputs_ms"][0] > 0 and len(set(out["inputs_ms"])) == 1  # one call, its processor time
    assert all(m > 0 for m in out["peak_memory_bytes"])


def test_output_matches_the_parquet_schema(qwen: VideoModelWorker) -> None:
    from pipeline.schema import conform

    table = conform(qwen(as_batch(THREE_CLIPS[:1] + [upstream_error_row("x")])))
    assert table.column("status").to_pylist() == ["ok", "error"]
    assert table.column("started_at").type.tz == "UTC"


def test_qa_two_questions_give_two_rows_per_clip(qwen: VideoModelWorker) -> None:
    qa = PromptConfig(task="qa", questions=["What happens?", "What colour is it?"], system="Be brief.")
    rows = as_batch(THREE_CLIPS[:2]).to_pylist()
    out = rows_to_columns(model_stage_module.answer_rows(qwen.loaded, rows, qa, GREEDY))
    assert list(zip(out["clip_id"], out["prompt"])) == [
        ("a", "What happens?"), ("a", "What colour is it?"), ("b", "What happens?"), ("b", "What colour is it?")
    ]
    assert out["status"] == ["ok"] * 4


def test_error_rows_pass_through_and_corrupt_frames_fail_alone(qwen: VideoModelWorker) -> None:
    corrupt = {**clip_row("bad", 4, 56, 56), "frames_shape": np.array([5, 56, 56, 3])}
    out = qwen(as_batch([THREE_CLIPS[0], upstream_error_row("x"), corrupt, THREE_CLIPS[1]]))

    assert out["clip_id"] == ["a", "x", "bad", "b"]
    assert out["status"] == ["ok", "error", "error", "ok"]
    assert out["error"][1] == "decode: moov atom not found" and out["error_stage"][1] == "decode"
    assert out["prompt"][1] == "" and out["output_text"][1] is None
    assert out["error"][2].startswith("frames: 37632 bytes do not hold frames_shape [5, 56, 56, 3]")
    assert out["error_stage"][2] == "model" and out["prompt"][2] == ""
    assert all(out["output_text"][i] for i in (0, 3))


def test_rows_say_what_produced_them(cache_dir: str, qwen: VideoModelWorker) -> None:
    from workers.provenance import engine_fingerprint

    quarter = VideoModelWorker(model_cfg(retention=0.25, cache_dir=cache_dir), GREEDY, CAPTION)
    depth = quarter.loaded.model.config.get_text_config().num_hidden_layers
    schedule = list(v2drop.Schedule.for_retention(depth, 0.25).layers)
    for worker, cfg, layers in ((qwen, model_cfg(), []), (quarter, model_cfg(retention=0.25), schedule)):
        row = worker(as_batch(THREE_CLIPS[:1]))
        assert row["engine_fingerprint"] == [engine_fingerprint(cfg, GREEDY, None)]
        assert row["drop_layers"] == [layers] and len(row["drop_keep"][0]) == len(layers)
        assert row["self_check"][0].startswith("passed (qwen2_5_vl, transformers ")
        assert (row["model_dtype"], row["attn_implementation"], row["inputs_device"]) == (["float32"], ["sdpa"], ["cpu"])
        assert row["transformers_version"][0] and row["torch_version"][0] and row["project_version"] == ["0.1.0"]
    assert engine_fingerprint(model_cfg(), GREEDY, None) != engine_fingerprint(model_cfg(retention=0.25), GREEDY, None)
    assert engine_fingerprint(model_cfg(), GREEDY, None) != engine_fingerprint(model_cfg(), GREEDY, "Be brief.")


def test_a_failing_self_check_fails_model_loading(cache_dir: str, monkeypatch) -> None:
    from v2drop import compat, loop, runtime_check

    monkeypatch.setattr(loop, "cache_kwarg", lambda cache: {compat.CACHE_ARG: None})  # the 5.24 breakage
    runtime_check._cached.cache_clear()
    try:
        with pytest.raises(v2drop.SelfCheckError, match="keep at 1.0"):
            VideoModelWorker(model_cfg(cache_dir=cache_dir), GREEDY, CAPTION)
    finally:
        runtime_check._cached.cache_clear()


def test_retention_quarter_drops_visual_tokens_and_full_keeps_them(cache_dir: str, qwen: VideoModelWorker) -> None:
    dropping = VideoModelWorker(model_cfg(retention=0.25, cache_dir=cache_dir), GREEDY, CAPTION)
    full, dropped = qwen(as_batch(THREE_CLIPS)), dropping(as_batch(THREE_CLIPS))

    assert dropped["status"] == ["ok"] * 3 and dropped["retention_asked"] == [0.25] * 3
    assert dropped["retention_achieved"] == pytest.approx([0.25] * 3, abs=0.03)
    for stages_full, stages_dropped in zip(full["visual_tokens_per_stage"], dropped["visual_tokens_per_stage"]):
        assert len(set(stages_full)) == 1  # no drop stage changes the count
        assert stages_dropped[0] == stages_full[0]
        assert all(later < earlier for earlier, later in zip(stages_dropped, stages_dropped[1:]))
    assert all(d < f for d, f in zip(dropped["flops_dropped"], dropped["flops_full"]))
    assert dropped["flops_full"] == full["flops_full"]


def test_llava_onevision_runs_through_the_same_worker(cache_dir: str, caplog) -> None:
    llava = VideoModelWorker(model_cfg("tiny:llava_onevision", retention=0.25, cache_dir=cache_dir), GREEDY, CAPTION)
    clips = [clip_row("a", 4, 112, 112, 0), clip_row("b", 2, 84, 140, 1), clip_row("c", 4, 140, 84, 2)]
    with caplog.at_level(logging.WARNING, logger="workers.model_calls"):
        out = llava(as_batch(clips))

    assert out["status"] == ["ok"] * 3 and all(text.strip() for text in out["output_text"])
    assert out["model_random_weights"] == [True] * 3
    assert [stages[0] for stages in out["visual_tokens_per_stage"]] == [65, 33, 65]  # T * 4 * 4 + 1 newline
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # frame counts grouped, no fallback


def test_s3_model_is_downloaded_once_into_the_node_cache_and_captions(cache_dir, s3_server, s3_bucket, tmp_path):
    import boto3

    local = resolve_model_source("tiny:qwen2_5_vl", cache_dir=cache_dir).path_or_id
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for file in Path(local).iterdir():
        client.upload_file(str(file), s3_bucket, f"models/tiny/{file.name}")
    uri = f"s3://{s3_bucket}/models/tiny"
    storage = Storage(StorageConfig(endpoint_url=s3_server))
    node_cache = tmp_path / "node-cache"

    first = resolve_model_source(uri, cache_dir=node_cache, storage=storage)
    again = resolve_model_source(uri + "/", cache_dir=node_cache, storage=storage)
    assert first.path_or_id == again.path_or_id and first.path_or_id.startswith(str(node_cache))
    assert first.model_id == uri and first.random_weights is True  # the tiny marker travelled with the files
    out = VideoModelWorker(model_cfg(uri, cache_dir=str(node_cache)), GREEDY, CAPTION, storage=storage)(as_batch(THREE_CLIPS[:1]))
    assert out["status"] == ["ok"] and out["model_id"] == [uri]


def test_qwen3_vl_runs_through_the_same_worker(cache_dir: str) -> None:
    qwen3 = VideoModelWorker(model_cfg("tiny:qwen3_vl", retention=0.25, cache_dir=cache_dir), GREEDY, CAPTION)
    clips = [clip_row("a", 4, 112, 112, 0), clip_row("b", 6, 84, 140, 1)]
    out = qwen3(as_batch(clips))

    assert out["status"] == ["ok"] * 2 and all(text.strip() for text in out["output_text"])
    assert out["model_id"] == ["tiny:qwen3_vl"] * 2 and out["model_random_weights"] == [True] * 2
    # 112x112 -> 128x128 (multiples of 32): 2 temporal patches x 8x8 / 4; 84x140 -> 96x128: 3 x 6x8 / 4.
    assert [stages[0] for stages in out["visual_tokens_per_stage"]] == [32, 36]
    assert all(stages[-1] < stages[0] for stages in out["visual_tokens_per_stage"])
