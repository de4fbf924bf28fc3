"""workers.shadow on the real tiny Qwen2.5-VL (random weights), called directly (no Ray).

The shadow's full-token output must be what a run without V²Drop writes, its measures must
describe the two texts it holds, and the run's own outputs must not change because of it.
"""

from __future__ import annotations

import pytest

import v2drop
from tests.workers.test_model_stage import CAPTION, GREEDY, clip_row, model_cfg
from workers import agreement, shadow
from workers.model_stage import VideoModelWorker, answer_rows, enable_v2drop
from workers.settings import PromptConfig, QualityConfig

CLIPS = [clip_row("a", 2, 56, 84, 0), clip_row("b", 2, 84, 56, 1), clip_row("c", 2, 56, 56, 2)]
ALL = QualityConfig(shadow_fraction=1.0)
NONE = QualityConfig(shadow_fraction=0.0)


@pytest.fixture(scope="module")
def full(cache_dir: str) -> VideoModelWorker:
    return VideoModelWorker(model_cfg(retention=1.0, cache_dir=cache_dir), GREEDY, CAPTION)


@pytest.fixture(scope="module")
def dropping(cache_dir: str) -> VideoModelWorker:
    return VideoModelWorker(model_cfg(retention=0.25, cache_dir=cache_dir), GREEDY, CAPTION)


def shadow_of(worker: VideoModelWorker, clips: list[dict], quality: QualityConfig) -> list[dict]:
    return answer_rows(worker.loaded, clips, CAPTION, GREEDY, quality)


# -- choosing the sample ---------------------------------------------------------------------


def test_the_sample_is_a_pure_function_of_the_clip_id_and_the_fraction() -> None:
    ids = [f"clip-{i}" for i in range(20_000)]
    chosen = [clip for clip in ids if shadow.in_sample(clip, 0.02)]
    assert 0.015 < len(chosen) / len(ids) < 0.025
    assert chosen == [clip for clip in ids if shadow.in_sample(clip, 0.02)]  # a resume picks the same clips
    assert all(shadow.in_sample(clip, 0.5) for clip in chosen)  # a larger fraction keeps the smaller one's clips
    assert not any(shadow.in_sample(clip, 0.0) for clip in ids[:1000])
    assert all(shadow.in_sample(clip, 1.0) for clip in ids[:1000])


def test_calls_group_equal_frame_counts_and_hold_at_most_chunk_items() -> None:
    items = [(clip_row("a", 4, 28, 28), "p"), (clip_row("b", 2, 28, 28), "p"), (clip_row("c", 4, 28, 28), "p"),
             (clip_row("d", 4, 28, 28), "p")]
    assert shadow.calls_by_frame_count(items, [0, 1, 2, 3], chunk=2) == [[0, 2], [3], [1]]
    assert shadow.calls_by_frame_count(items, [], chunk=2) == []


# -- the real tiny model -------------------------------------------------------------------------


def test_at_retention_one_the_guard_reports_full_agreement(full: VideoModelWorker) -> None:
    rows = shadow_of(full, CLIPS, ALL)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert [r["shadow_output_text"] for r in rows] == [r["output_text"] for r in rows]
    assert all(r["shadow_exact_match"] and r["shadow_token_f1"] == 1.0 and r["shadow_lcs_ratio"] == 1.0 for r in rows)
    assert all(r["shadow_first_diff_word"] is None and r["shadow_top1_agree"] for r in rows)
    assert all(r["shadow_kl_first_token"] < 1e-6 for r in rows)
    assert all(r["shadow_ms"] > 0 and r["shadow_flops"] == pytest.approx(2 * r["flops_full"]) for r in rows)


def test_with_drops_the_shadow_is_the_full_model_and_its_measures_describe_the_texts(
    full: VideoModelWorker, dropping: VideoModelWorker
) -> None:
    plain = [r["output_text"] for r in shadow_of(dropping, CLIPS, NONE)]
    rows = shadow_of(dropping, CLIPS, ALL)
    reference = [r["output_text"] for r in shadow_of(full, CLIPS, NONE)]

    assert [r["output_text"] for r in rows] == plain  # the shadow leaves the run's own outputs alone ...
    assert v2drop.is_enabled(dropping.loaded.model)  # ... and V²Drop on afterwards
    assert [r["shadow_output_text"] for r in rows] == reference  # the stock model's outputs, same inputs
    assert all(r["retention_achieved"] < 1 for r in rows)
    for r in rows:
        assert {k: r[k] for k in agreement.text_measures("", "")} == agreement.text_measures(r["shadow_output_text"],
                                                                                             r["output_text"])
        assert 0 <= r["shadow_token_f1"] <= 1 and 0 <= r["shadow_lcs_ratio"] <= 1
        assert r["shadow_kl_first_token"] > 0  # the dropped prefill changes the next-token distribution
        if not r["shadow_top1_agree"]:  # greedy: a different first token is a different first word
            assert r["shadow_first_diff_word"] == 0 and not r["shadow_exact_match"]
        # the shadow's FLOPs: the dropped first-token prefill plus the full-token one
        assert r["shadow_flops"] == pytest.approx(r["flops_dropped"] + r["flops_full"])
    assert not all(r["shadow_exact_match"] for r in rows)  # random weights at 25 %: disagreement is measured


def test_only_sampled_ok_clips_get_shadow_columns(full: VideoModelWorker) -> None:
    draws = sorted(CLIPS, key=lambda clip: shadow.sample_draw(clip["clip_id"]))
    fraction = (shadow.sample_draw(draws[0]["clip_id"]) + shadow.sample_draw(draws[1]["clip_id"])) / 2
    broken = {**clip_row("z", 2, 56, 56), "frames_shape": [3, 56, 56, 3]}
    rows = shadow_of(full, [*CLIPS, broken], QualityConfig(shadow_fraction=fraction))
    shadowed = {r["clip_id"] for r in rows if r["shadow_output_text"] is not None}
    assert shadowed == {draws[0]["clip_id"]}
    assert all(r["shadow_lcs_ratio"] is None for r in rows if r["clip_id"] not in shadowed)


def test_the_rows_model_calls_end_before_the_guard_runs(full: VideoModelWorker, monkeypatch) -> None:
    """finished_at is the end of the rows' own model calls (the report's throughput over time):
    the guard's calls, which can take as long again, come after it."""
    from workers import model_stage

    guard_started = []
    real = model_stage.run_shadow
    monkeypatch.setattr(model_stage, "run_shadow", lambda *args: guard_started.append(model_stage.utc_now()) or real(*args))
    rows = shadow_of(full, CLIPS, ALL)
    assert guard_started and all(r["finished_at"] <= guard_started[0] for r in rows)


def test_switching_v2drop_off_is_undone_even_when_the_block_fails(dropping: VideoModelWorker) -> None:
    model, loaded = dropping.loaded.model, dropping.loaded
    with pytest.raises(RuntimeError, match="inside"):
        with shadow.v2drop_off(model, lambda m: enable_v2drop(m, loaded.retention_asked, loaded.scorer)):
            assert not v2drop.is_enabled(model)
            raise RuntimeError("inside")
    assert v2drop.is_enabled(model)


def test_qa_shadows_every_question_of_a_sampled_clip_against_the_stock_models_answers(
    full: VideoModelWorker, dropping: VideoModelWorker
) -> None:
    qa = PromptConfig(task="qa", questions=["What happens?", "What colour is it?"])
    rows = answer_rows(dropping.loaded, CLIPS[:2], qa, GREEDY, ALL)  # the video prefill is shared per clip
    reference = answer_rows(full.loaded, CLIPS[:2], qa, GREEDY, NONE)
    assert [(r["clip_id"], r["prompt"]) for r in rows] == [(r["clip_id"], r["prompt"]) for r in reference]
    assert [r["shadow_output_text"] for r in rows] == [r["output_text"] for r in reference]
    assert all(r["shadow_lcs_ratio"] == agreement.lcs_ratio(r["shadow_output_text"], r["output_text"]) for r in rows)
