"""What one dropping prefill did, per sample: the record the prefill keeps and the stats dicts
`v2drop.last_stats` makes from it when asked (no transformers import)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from v2drop.flops import TextShape, prefill_flops
from v2drop.schedule import Schedule


@dataclass
class DropRecord:
    """What one dropping prefill's per-sample stats need. The kept positions stay on the device
    until the stats are asked for, so the forward never waits to copy them."""

    visual_per_layer: list[tuple[int, ...]]  # [num_layers][B] visual tokens entering each layer
    text_tokens: tuple[int, ...]  # [B] real non-visual tokens (never dropped)
    kept_positions: list[torch.Tensor] = field(default_factory=list)  # per drop: [B, L_s] source idx, -1 if not visual


def kept_visual_positions(kept_positions: list[torch.Tensor], batch: int) -> list[list[list[int]]]:
    """[B][drop] sorted source positions of the visual tokens each drop kept; one device-to-host
    copy for all drops."""
    flat = torch.cat([p.flatten() for p in kept_positions]).tolist() if kept_positions else []
    kept: list[list[list[int]]] = [[] for _ in range(batch)]
    offset = 0
    for positions in kept_positions:
        width = positions.shape[1]
        for b in range(batch):
            kept[b].append(sorted(p for p in flat[offset + b * width: offset + (b + 1) * width] if p >= 0))
        offset += batch * width
    return kept


def per_sample_stats(record: DropRecord, schedule: Schedule, shape: TextShape) -> list[dict]:
    """One dict per sample: per-layer and per-stage visual counts, retention, FLOPs."""
    visual = [list(row) for row in zip(*record.visual_per_layer)]  # [B][num_layers]
    kept = kept_visual_positions(record.kept_positions, len(visual))
    stage_layers = [0, *schedule.layers]
    stats = []
    for b, (counts, text) in enumerate(zip(visual, record.text_tokens)):
        initial = counts[0]
        stats.append(
            {
                "visual_tokens_per_layer": counts,
                "visual_tokens_per_stage": [counts[l] for l in stage_layers],
                "num_visual_tokens": initial,
                "num_text_tokens": text,
                "retention": sum(counts) / (len(counts) * initial) if initial else 1.0,
                "drop_layers": list(schedule.layers),
                "keep": list(schedule.keep),
                "kept_visual_positions_per_stage": kept[b],
                "prefill_flops": prefill_flops(shape, [text + c for c in counts]),
                "prefill_flops_full": prefill_flops(shape, [text + initial] * len(counts)),
            }
        )
    return stats
