"""V²Drop: variation-aware visual-token dropping inside Hugging Face vision-language models.

    import v2drop
    s = v2drop.Schedule.for_retention(num_layers=28, retention=0.25)
    v2drop.enable(model, s)          # model.generate(...) as usual
    v2drop.last_stats(model)         # per-sample token counts, retention, FLOPs
    v2drop.select_cache_rows(model, cache, index)   # fork a prefilled cache, e.g. per question
    v2drop.disable(model)

Knows nothing of Ray.
"""

from v2drop.api import disable, enable, is_enabled, last_stats, select_cache_rows
from v2drop.schedule import Schedule
from v2drop import vision  # vision.install(model): batched window attention without flash-attn

__all__ = ["Schedule", "enable", "disable", "is_enabled", "last_stats", "select_cache_rows"]
