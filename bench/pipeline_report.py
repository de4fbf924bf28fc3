"""The pipeline benchmark's report: the median of the repeats and the Markdown table of
`python -m bench.bench_pipeline` (variants side by side, then their ratio)."""

from __future__ import annotations

import statistics
from typing import Any


def median_row(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every number over the repeats; lists element-wise; the rest from the first run."""
    row = dict(repeats[0])
    for key, value in repeats[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in repeats)
        elif isinstance(value, list):
            row[key] = [statistics.median(r[key][i] for r in repeats) for i in range(len(value))]
    return row


def markdown(report: dict[str, Any]) -> str:
    a, c, v, r = report["args"], report["config"], report["variants"], report["ratios"]
    v2, off = v.values()  # first and second variant
    first, second = v
    lines = [
        f"# Pipeline throughput, {a['job']}: {first} vs {second} ({report['hardware']})",
        "",
        "Variants: " + "; ".join(f"{name} = `{' '.join(o)}`" for name, o in report["variants_overrides"].items()) + ".",
        "",
        f"`pipeline.run.run` on jobs/{a['job']}.yaml preset=offline over `{a['videos']}`: "
        f"{report['model']} ({c['model']['dtype']}, {c['model']['attn_implementation']}), "
        f"{c['decode']['num_frames']} frames of <= {c['decode']['max_pixels']} px per {c['clips']['clip_len_s']:g} s clip, "
        f"actors batch {c['actors']['batch_size']}, max_new_tokens {c['generation']['max_new_tokens']}; "
        f"median of {a['repeats']} repeats, variants alternating, each run into a fresh output folder.",
        "",
        f"**The model has random weights** (its text is noise) and **absolute CPU times are not GPU figures**; "
        f"only the ratios carry over, and only roughly. Wall time includes Ray Data planning, actor start and "
        f"model load, which do not shrink with the model's work. Noise: {report['noise']}.",
        "",
        "| variant | wall s | clips/s | video-s/s | output tok | output tok/s | prefill ms/batch | generate ms/batch "
        "| inputs ms/clip | prefill ms/clip | model ms/clip | visual tokens per stage | retention | FLOPs saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in v.items():
        tokens = " / ".join(f"{t:.0f}" for t in row["visual_tokens_per_stage"])
        lines.append(
            f"| {name} | {row['wall_s']:.1f} | {row['clips_per_s']:.3f} | {row['video_s_per_s']:.3f} | "
            f"{row['output_tokens']:.0f} | {row['output_tokens_per_s']:.2f} | {row['prefill_ms_per_batch']:.0f} | "
            f"{row['generate_ms_per_batch']:.0f} | {row['inputs_ms_per_clip']:.0f} | {row['prefill_ms_per_clip']:.0f} | {row['model_ms_per_clip']:.0f} | "
            f"{tokens} | {row['retention_achieved']:.3f} | "
            f"{100 * row['flops_saved_rows']:.1f} % |"
        )
    lines.append(
        f"| **{report['ratio']}** | {r['wall_s']:.3f} | {r['clips_per_s']:.3f} | {r['video_s_per_s']:.3f} | | "
        f"{r['output_tokens_per_s']:.3f} | {r['prefill_ms_per_batch']:.3f} | {r['generate_ms_per_batch']:.3f} | "
        f"{r['inputs_ms_per_clip']:.3f} | {r['prefill_ms_per_clip']:.3f} | {r['model_ms_per_clip']:.3f} | | | "
        f"FLOP ratio {r['prefill_flops']:.3f} |"
    )
    lines += [
        "",
        f"Clips ok per run: {off['clips_ok']:.0f} ({off['video_seconds']:.1f} video-s, {off['rows_ok']:.0f} ok rows); "
        f"generate calls: {first} {v2['model_calls']:.0f}, {second} {off['model_calls']:.0f}; rows error/skipped: {off['rows_error']:.0f}/{off['rows_skipped']:.0f} "
        f"(by stage {off['errors_by_stage']}). Output tokens per ok row: {first} "
        f"{v2['output_tokens'] / v2['rows_ok']:.1f}, {second} {off['output_tokens'] / off['rows_ok']:.1f} of "
        f"max {c['generation']['max_new_tokens']} (random weights may stop at EOS early). "
        f"Decode ms per clip: {first} {v2['decode_ms_per_clip']:.0f}, {second} {off['decode_ms_per_clip']:.0f}.",
        "",
        "Per run (wall s, 1-min load average before -> after):",
    ]
    for name, repeats in report["runs"].items():
        lines.append(f"- {name}: " + "; ".join(
            f"{x['wall_s']:.1f} s (load {x['load_avg_1m_before']:.2f} -> {x['load_avg_1m_after']:.2f})" for x in repeats))
    return "\n".join(lines) + "\n"
