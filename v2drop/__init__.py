"""V²Drop: variation-aware visual-token dropping inside Hugging Face vision-language models.

    import v2drop
    s = v2drop.Schedule.for_retention(num_layers=28, retention=0.25)
    v2drop.enable(model, s)          # model.generate(...) as usual
    v2drop.enable(model, s, prefill_graphs=v2drop.PrefillGraphs())  # CUDA: small prefills replayed as graphs
    v2drop.last_stats(model)         # per-sample token counts, retention, FLOPs (the engine's detail)
    v2drop.prefill_stats(model, ids, mask, marker)  # one VisualStats per sample, stock model too
    v2drop.select_cache_rows(model, cache, index)   # fork a prefilled cache, e.g. per question
    v2drop.disable(model)
    v2drop.self_check(model)         # the patched forward vs the stock model and a slow reference

enable() refuses a transformers release outside `v2drop.compat.TESTED_TRANSFORMERS` unless the
caller opts in, and self-checks each family once per process before patching it.

Knows nothing of Ray.

The names below are imported on first use (PEP 562), so that `v2drop.ENGINE_VERSION` costs no
torch import: the pipeline's driver computes the engine fingerprint from it and never loads a model.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Bump when a change to the engine can change its outputs for the same model and inputs: rows
# written by another engine version are redone on resume (workers.provenance.engine_fingerprint).
# 3: the vision tower's batched window attention, fused RMSNorms and patch embedding as a matrix
# product (v2drop.vision), which came after 2 and round differently (about 1e-5 in float32, one
# unit in the last place in bf16).
# 4: the static engine (its prefill and step, and the shared video prefill it continues from)
# computes q/k/v and gate/up as one matrix product each (v2drop.fused_projections), which a GPU's
# BLAS may round differently from three (two).
# 5: the static engine applies the model's repetition penalty (v2drop.greedy) after the first
# token, as generate() does; under flash-attn its step now runs instead of failing over.
# 6: that penalty leaves each row's left padding out, as generate() does (a padded row penalised
# its pad token, which is an end token of the Qwen families).
ENGINE_VERSION = "6"

_HOME = {  # public name -> the submodule that defines it
    "disable": "api", "enable": "api", "is_enabled": "api", "last_stats": "api", "schedule_of": "api",
    "select_cache_rows": "api",
    "SelfCheckError": "runtime_check", "SelfCheckResult": "runtime_check", "self_check": "runtime_check",
    "PrefillGraphs": "prefill_graphs",
    "Schedule": "schedule",
    "VisualStats": "stats", "continued": "stats", "prefill_stats": "stats", "stats_marker": "stats",
}
__all__ = ["ENGINE_VERSION", "fused_projections", "vision", *_HOME]

if TYPE_CHECKING:  # what the type checker sees (`x as x`: re-exported); at run time __getattr__ imports them
    from v2drop import fused_projections as fused_projections
    from v2drop import vision as vision
    from v2drop.api import disable as disable
    from v2drop.api import enable as enable
    from v2drop.api import is_enabled as is_enabled
    from v2drop.api import last_stats as last_stats
    from v2drop.api import schedule_of as schedule_of
    from v2drop.api import select_cache_rows as select_cache_rows
    from v2drop.prefill_graphs import PrefillGraphs as PrefillGraphs
    from v2drop.runtime_check import SelfCheckError as SelfCheckError
    from v2drop.runtime_check import SelfCheckResult as SelfCheckResult
    from v2drop.runtime_check import self_check as self_check
    from v2drop.schedule import Schedule as Schedule
    from v2drop.stats import VisualStats as VisualStats
    from v2drop.stats import continued as continued
    from v2drop.stats import prefill_stats as prefill_stats
    from v2drop.stats import stats_marker as stats_marker


def __getattr__(name: str) -> Any:
    """A public name from its submodule, or a submodule (`v2drop.vision`), imported on first use."""
    if name in _HOME:
        value = getattr(importlib.import_module(f"v2drop.{_HOME[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"v2drop.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"v2drop.{name}":
                raise
    raise AttributeError(f"module 'v2drop' has no attribute {name!r}")
