"""Attention masks for forwards on a dropped cache, built without per-stage host-device syncs.

transformers' `create_causal_mask` asks "is this 2-D mask all ones?" (`fast_all(...)`, read by
Python) so that sdpa may run without a mask. On a GPU that question is a host-device sync: the
CPU waits for the GPU queue to drain before it can launch the next kernel. The stock model asks
once per decode step; a dropped cache has one key mask per stage, and asking per stage multiplied
the syncs (1 -> 4 for the default 3-drop schedule), which made a V²Drop step slower than a stock one.

Here one host flag per cache (`StageMasks.all_valid`: no stage holds padding, known since the
prefill) replaces the per-stage questions:

* flag set and one new token per row: no stage needs a mask (sdpa then runs maskless with
  grouped-query heads), and nothing is asked (see `v2drop.loop.still_all_valid` for why).
* otherwise: build every stage's mask from its 2-D key mask with tensor ops only, no sync, as the
  additive float mask [B, 1, Q, K] (0 = attend, dtype min = masked) that transformers' eager path
  uses and that sdpa takes as is (a bool mask would be turned into a float one by sdpa in every layer).

Key j is visible to new token i when it is valid and j <= cached + i (causal over the new tokens;
every cached key precedes every new one). Worked example: cached 3, Q 2, valid [[F, T, T, T, T]]
-> query 0 sees keys 1..3, query 1 sees keys 1..4.

Other attention implementations (flash-attention, flex) take masks in their own formats; for them
the caller falls back to transformers' `create_causal_mask`.
"""

from __future__ import annotations

import torch

FORMATTED_HERE = ("sdpa", "eager")


def builds_masks_for(attn_implementation: str) -> bool:
    return attn_implementation in FORMATTED_HERE


def additive_key_mask(valid: torch.Tensor, num_new: int, dtype: torch.dtype) -> torch.Tensor:
    """valid: [B, K] bool over a stage's cache plus the `num_new` new tokens (its last columns).

    Returns [B, 1, Q, K] (Q = 1 broadcasts over queries) of `dtype`: 0 where attended, dtype min elsewhere.
    """
    mask = valid.reshape(valid.shape[0], 1, 1, valid.shape[1])  # a view
    if num_new > 1:
        mask = mask & new_token_causality(valid.shape[1], num_new, valid.device)
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def new_token_causality(num_keys: int, num_new: int, device) -> torch.Tensor:
    """[Q, K] bool: key j visible to new token i iff j <= (K - Q) + i."""
    keys = torch.arange(num_keys, device=device)
    last_visible = torch.arange(num_keys - num_new, num_keys, device=device)
    return keys[None, :] <= last_visible[:, None]


def all_real(valid: torch.Tensor) -> bool:
    """One host-device sync: True when `valid` holds no padding."""
    return bool(valid.sum() == valid.numel())
