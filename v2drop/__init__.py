"""V²Drop: variation-aware visual-token dropping inside Hugging Face vision-language models.

    import v2drop
    s = v2drop.Schedule.for_retention(num_layers=28, retention=0.25)
    v2drop.enable(model, s)          # model.generate(...) as usual
    v2drop.last_stats(model)         # per-sample token counts, retention, FLOPs (the engine's detail)
    v2drop.prefill_stats(model, ids, mask, marker)  # one VisualStats per sample, stock model too
    v2drop.select_cache_rows(model, cache, index)   # fork a prefilled cache, e.g. per question
    v2drop.disable(model)
    v2drop.self_check(model)         # the patched forward vs the stock model and a slow reference

enable() refuses a transformers release outside `v2drop.compat.TESTED_TRANSFORMERS` unless the
caller opts in, and self-checks each family once per process before patching it.

Knows nothing of Ray.
"""

from v2drop import vision as vision  # vision.install(model): batched window attention without flash-attn
from v2drop.api import disable, enable, is_enabled, last_stats, schedule_of, select_cache_rows
from v2drop.runtime_check import SelfCheckError, SelfCheckResult, self_check
from v2drop.schedule import Schedule
from v2drop.stats import VisualStats, continued, prefill_stats, stats_marker

# Bump when a change to the engine can change its outputs for the same model and inputs: rows
# written by another engine version are redone on resume (workers.provenance.engine_fingerprint).
ENGINE_VERSION = "2"

__all__ = ["Schedule", "enable", "disable", "is_enabled", "last_stats", "schedule_of", "select_cache_rows",
           "self_check", "SelfCheckError", "SelfCheckResult", "ENGINE_VERSION", "VisualStats", "prefill_stats",
           "stats_marker", "continued"]
