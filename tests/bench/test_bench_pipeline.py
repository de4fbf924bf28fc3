"""The pipeline benchmark's report (bench.pipeline_report): medians over repeats and the table.

The benchmark itself runs the whole pipeline several times (minutes); these check, in
milliseconds, the arithmetic and the table it prints from the measured repeats.
"""

from __future__ import annotations

from bench.bench_pipeline import JOBS, RATIO_KEYS
from bench.pipeline_report import markdown, median_row


def _run(wall_s: float, tokens: list[float], **extra: float) -> dict:
    numbers = dict(clips_per_s=6 / wall_s, video_s_per_s=25.7 / wall_s, output_tokens=96.0, output_tokens_per_s=96 / wall_s,
                   prefill_ms_per_batch=200.0, generate_ms_per_batch=300.0, inputs_ms_per_clip=20.0, prefill_ms_per_clip=100.0,
                   model_ms_per_clip=150.0, prefill_flops=1e9, retention_achieved=0.25, flops_saved_rows=0.75,
                   clips_ok=6, rows_ok=6, rows_error=0, rows_skipped=0, video_seconds=25.7, model_calls=3,
                   decode_ms_per_clip=50.0, load_avg_1m_before=1.0, load_avg_1m_after=2.0)
    numbers.update(extra)
    return {"wall_s": wall_s, "visual_tokens_per_stage": tokens, "errors_by_stage": {}, "model_random_weights": True,
            **numbers}


def test_median_row_takes_each_number_and_each_list_element_apart() -> None:
    runs = [_run(10.0, [1250, 312]), _run(30.0, [1250, 320]), _run(12.0, [1240, 300])]
    row = median_row(runs)
    assert row["wall_s"] == 12.0  # the median, not the mean (17.3) nor the first (10)
    assert row["visual_tokens_per_stage"] == [1250, 312]  # element-wise medians
    assert row["model_random_weights"] is True and row["errors_by_stage"] == {}  # the rest from the first run


def test_markdown_prints_every_variant_and_the_ratio_of_first_to_second() -> None:
    first, second = JOBS["caption"]
    rows = {first: median_row([_run(9.0, [1250, 312], prefill_flops=2e8)]),
            second: median_row([_run(12.0, [1250], flops_saved_rows=0.0)])}
    report = {
        "hardware": "CPU x86_64, 2 cores", "noise": "none", "model": "tiny", "variants": rows,
        "args": {"job": "caption", "videos": "../shared/videos", "repeats": 1},
        "config": {"model": {"dtype": "float32", "attn_implementation": "sdpa"},
                   "decode": {"num_frames": 16, "max_pixels": 200704}, "clips": {"clip_len_s": 10.0},
                   "actors": {"batch_size": 2}, "generation": {"max_new_tokens": 16}},
        "variants_overrides": JOBS["caption"], "ratio": f"{first} / {second}",
        "ratios": {key: rows[first][key] / rows[second][key] for key in RATIO_KEYS},
        "runs": {first: [rows[first]], second: [rows[second]]},
    }
    text = markdown(report)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == [f"| {first}", f"| {second}", f"| **{first} / {second}**"]
    assert "| 0.750 |" in table[-1]  # wall s: 9 / 12
    assert "FLOP ratio 0.200 |" in table[-1]  # 2e8 / 1e9
    assert "1250 / 312" in table[1] and "75.0 %" in table[1]
    assert "| inputs ms/clip | prefill ms/clip | model ms/clip |" in table[0] and "| 20 | 100 | 150 |" in table[1]
