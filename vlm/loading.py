"""A model and its processor from a folder or hub id, in eval mode on a device.

The model class is the family's row in `vlm.families` (read from config.json), so a checkpoint of a
family the project does not support is refused by name before any weights are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlm.families import family
from vlm.processing import load_processor


def model_type(path_or_id: str | Path, **hub_kwargs: Any) -> str:
    """config.json's model_type, without loading weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path_or_id, **hub_kwargs).model_type


def load_model(path_or_id: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               device: str | torch.device = "cpu", **hub_kwargs: Any) -> torch.nn.Module:
    """The family's model class from `path_or_id`; `hub_kwargs` (revision, ...) reach from_pretrained."""
    import transformers

    model_cls = getattr(transformers, family(model_type(path_or_id, **hub_kwargs)).model_class)
    # use_kernels=False: no layer replaced by a kernel fetched from the Hub (the default from
    # transformers 5.25 on): v2drop patches and fuses the text model's layers itself, the
    # self-check's tiny models have none, and actors may run offline
    model = model_cls.from_pretrained(path_or_id, dtype=dtype, attn_implementation=attn_implementation,
                                      use_kernels=False, **hub_kwargs)
    return model.to(device).eval()


def load(path_or_id: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
         device: str | torch.device = "cpu", **hub_kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """(model, processor); the processor pads on the left, for generation."""
    model = load_model(path_or_id, dtype=dtype, attn_implementation=attn_implementation, device=device, **hub_kwargs)
    return model, load_processor(path_or_id, padding_side="left", **hub_kwargs)
