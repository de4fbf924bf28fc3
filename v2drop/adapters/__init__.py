"""Per-family adapters, dispatched on `config.model_type`."""

from __future__ import annotations

from torch import nn

from v2drop.adapters.base import FamilyAdapter
from v2drop.adapters.llava_onevision import LLAVA_ONEVISION
from v2drop.adapters.qwen2_5_vl import QWEN2_5_VL
from v2drop.adapters.qwen3_vl import QWEN3_VL

ADAPTERS: tuple[FamilyAdapter, ...] = (QWEN2_5_VL, QWEN3_VL, LLAVA_ONEVISION)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for this model, or a ValueError naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise ValueError(
        f"v2drop does not support model_type {model_type!r} ({type(model).__name__}); "
        f"supported families: {supported}"
    )
