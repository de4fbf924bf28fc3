"""The summary's `quality` block: what the shadow sample (workers.shadow) says about this run.

From the ok rows that carry shadow columns (`shadow_output_text` not null): how many clips and
rows were compared, the agreement of the dropped outputs with the full-token ones (mean and
10th percentile of `shadow_lcs_ratio`, the headline measure), the other measures' means, and a
verdict against `quality.min_agreement`:

    pass           mean agreement >= min_agreement
    warn           below it, quality.enforce false: the run says so and exits 0
    fail           below it, quality.enforce true: the CLI exits EXIT_QUALITY after writing everything
    not measured   no row was compared (shadow_fraction 0, or no sampled clip in this run)

The shadow's own cost is kept apart from the run's: its seconds (summed row shares) and FLOPs,
and those FLOPs as a fraction of the run's own prefill FLOPs (flops_dropped).
A resumed run compares only the clips it ran itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import QualityConfig

HEADLINE = "shadow_lcs_ratio"  # the agreement the verdict reads (workers.agreement.lcs_ratio)
LOW_PERCENTILE = 10
VERDICTS = ("pass", "warn", "fail", "not measured")
_COLUMNS = ("clip_id", "shadow_lcs_ratio", "shadow_token_f1", "shadow_exact_match", "shadow_top1_agree",
            "shadow_kl_first_token", "shadow_ms", "shadow_flops")


@dataclass
class QualityStats:
    """Shadow rows seen so far (a few per cent of the rows, so their values are kept)."""

    clips: set[str] = field(default_factory=set)
    values: dict[str, list] = field(default_factory=lambda: {name: [] for name in _COLUMNS[1:]})

    def update(self, ok: pa.Table) -> None:
        """Add the shadow rows of a table of ok rows (tables without the columns add nothing)."""
        if "shadow_output_text" not in ok.column_names:
            return
        rows = ok.filter(pc.is_valid(ok["shadow_output_text"])).select(list(_COLUMNS)).to_pydict()
        self.clips.update(rows["clip_id"])
        for name, values in self.values.items():
            values.extend(rows[name])

    def block(self, cfg: QualityConfig, run_flops: float) -> dict[str, Any]:
        agreement = [float(v) for v in self.values[HEADLINE] if v is not None]
        mean = float(np.mean(agreement)) if agreement else None
        shadow_flops = float(sum(v or 0.0 for v in self.values["shadow_flops"]))
        return {
            "shadow_fraction": cfg.shadow_fraction,
            "clips_compared": len(self.clips),
            "rows_compared": len(agreement),
            "agreement_measure": HEADLINE,
            "agreement_mean": mean,
            f"agreement_p{LOW_PERCENTILE}": float(np.percentile(agreement, LOW_PERCENTILE)) if agreement else None,
            "token_f1_mean": _mean(self.values["shadow_token_f1"]),
            "exact_match_rate": _mean(self.values["shadow_exact_match"]),
            "top1_agreement_rate": _mean(self.values["shadow_top1_agree"]),
            "kl_first_token_mean": _mean(self.values["shadow_kl_first_token"]),
            "min_agreement": cfg.min_agreement,
            "enforce": cfg.enforce,
            "verdict": verdict(mean, cfg),
            "shadow_s": float(sum(v or 0.0 for v in self.values["shadow_ms"])) / 1000.0,
            "shadow_flops": shadow_flops,
            "shadow_flops_vs_run": shadow_flops / run_flops if run_flops else None,
        }


def verdict(mean_agreement: float | None, cfg: QualityConfig) -> str:
    if mean_agreement is None:
        return "not measured"
    if mean_agreement >= cfg.min_agreement:
        return "pass"
    return "fail" if cfg.enforce else "warn"


def _mean(values: list) -> float | None:
    present = [float(v) for v in values if v is not None]
    return float(np.mean(present)) if present else None


def format_quality(quality: dict[str, Any]) -> str:
    """One line for the run summary table."""
    if quality["verdict"] == "not measured":
        return f"not measured (quality.shadow_fraction={quality['shadow_fraction']:g}, no clip compared)"
    low = quality[f"agreement_p{LOW_PERCENTILE}"]
    cost = quality["shadow_flops_vs_run"]
    return (f"{quality['verdict'].upper()}: agreement mean {quality['agreement_mean']:.3f}, p{LOW_PERCENTILE} {low:.3f} "
            f"over {quality['clips_compared']} clips (min {quality['min_agreement']:g}); top-1 "
            f"{quality['top1_agreement_rate']:.0%}; shadow cost {quality['shadow_s']:.1f} s, "
            + ("n/a" if cost is None else f"{cost:.1%}") + " of the run's FLOPs")
