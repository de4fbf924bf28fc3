"""The quality guard in a run: the summary's `quality` block, its verdict, and the CLI exit code.

The block is checked on hand-made shadow rows (known means, percentile and verdicts), then on
real runs of the tiny Qwen2.5-VL on a local Ray cluster: at retention 1.0 every compared clip
agrees, and an enforced threshold the dropped outputs miss makes the CLI exit 4 after writing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.__main__ import EXIT_QUALITY, _run
from pipeline._quality import QualityStats, format_quality, verdict
from pipeline.config import QualityConfig
from pipeline.run import run
from tests.pipeline.runs import offline, read_rows
from workers import shadow


def shadow_table(lcs: list[float | None]) -> pa.Table:
    n = len(lcs)
    present = [v is not None for v in lcs]
    return pa.table({
        "clip_id": [f"c{i // 2}" for i in range(n)],  # two rows (prompts) per clip
        "shadow_output_text": ["full" if p else None for p in present],
        "shadow_lcs_ratio": lcs,
        "shadow_token_f1": [v for v in lcs],
        "shadow_exact_match": [None if v is None else v == 1.0 for v in lcs],
        "shadow_top1_agree": [None if v is None else v > 0.5 for v in lcs],
        "shadow_kl_first_token": [None if v is None else 1 - v for v in lcs],
        "shadow_ms": [100.0 if p else None for p in present],
        "shadow_flops": [10.0 if p else None for p in present],
    })


def test_the_block_counts_only_shadow_rows_and_gives_mean_low_percentile_and_cost() -> None:
    stats = QualityStats()
    stats.update(shadow_table([1.0, 0.0, None, None]))
    stats.update(shadow_table([0.5, 1.0]))  # clip ids c0 again: one clip, counted once
    block = stats.block(QualityConfig(shadow_fraction=0.5, min_agreement=0.6), run_flops=400.0)
    assert (block["clips_compared"], block["rows_compared"]) == (1, 4)
    assert block["agreement_mean"] == pytest.approx(0.625)
    assert block["agreement_p10"] == pytest.approx(0.15)  # numpy's linear interpolation over [0, .5, 1, 1]
    assert block["exact_match_rate"] == 0.5 and block["top1_agreement_rate"] == 0.5
    assert block["shadow_s"] == pytest.approx(0.4) and block["shadow_flops_vs_run"] == pytest.approx(0.1)
    assert block["verdict"] == "pass"
    assert format_quality(block).startswith("PASS: agreement mean 0.625, p10 0.150 over 1 clips (min 0.6)")


def test_verdicts() -> None:
    assert verdict(0.7, QualityConfig(min_agreement=0.7)) == "pass"
    assert verdict(0.69, QualityConfig(min_agreement=0.7)) == "warn"
    assert verdict(0.69, QualityConfig(min_agreement=0.7, enforce=True)) == "fail"
    assert verdict(None, QualityConfig(enforce=True)) == "not measured"
    block = QualityStats().block(QualityConfig(shadow_fraction=0.0), run_flops=0.0)
    assert block["verdict"] == "not measured" and block["rows_compared"] == 0 and block["agreement_mean"] is None
    assert format_quality(block).startswith("not measured (quality.shadow_fraction=0")


@pytest.mark.slow
def test_at_retention_one_every_shadow_clip_agrees(ray_cluster: None, shared_videos: Path, tmp_path: Path) -> None:
    cfg = offline("caption.yaml", tmp_path, f"input.uri={shared_videos / 'nasa_13013.mp4'}", "model.retention=1.0",
                  "quality.shadow_fraction=1.0", "quality.enforce=true", "quality.min_agreement=1.0")
    summary = run(cfg)
    rows = read_rows(tmp_path).to_pylist()
    assert len(rows) == 3 and all(r["shadow_output_text"] == r["output_text"] for r in rows)
    quality = summary["quality"]
    assert (quality["clips_compared"], quality["agreement_mean"], quality["agreement_p10"]) == (3, 1.0, 1.0)
    assert quality["exact_match_rate"] == 1.0 and quality["top1_agreement_rate"] == 1.0
    assert quality["verdict"] == "pass" and quality["shadow_s"] > 0
    # at retention 1.0 the shadow repeats the run's prefill once more and adds its own first-token forward
    assert quality["shadow_flops_vs_run"] == pytest.approx(2.0)
    [summary_file] = (tmp_path / "runs").rglob("summary.json")
    assert json.loads(summary_file.read_text())["quality"]["verdict"] == "pass"


@pytest.mark.slow
def test_an_enforced_guard_exits_4_after_writing_every_row(ray_cluster: None, shared_videos: Path, tmp_path: Path,
                                                           capsys) -> None:
    cfg = offline("caption.yaml", tmp_path, f"input.uri={shared_videos / 'nasa_13013.mp4'}", "model.retention=0.25",
                  "quality.shadow_fraction=1.0", "quality.enforce=true", "quality.min_agreement=1.0")
    assert _run(cfg) == EXIT_QUALITY
    assert "quality error: shadow agreement below quality.min_agreement" in capsys.readouterr().err
    rows = read_rows(tmp_path).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3  # everything was written first
    assert all(0 <= r["shadow_lcs_ratio"] <= 1 for r in rows) and not all(r["shadow_exact_match"] for r in rows)
    assert all(shadow.in_sample(r["clip_id"], 1.0) for r in rows)
