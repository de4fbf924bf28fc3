"""The one place that knows every per-token tensor a drop must gather.

If a future transformers release adds another per-token input to the decoder layers, it is
added here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class TokenState:
    """Everything indexed by sequence position during a prefill. B = batch, L = length."""

    hidden: torch.Tensor  # [B, L, D] residual stream entering the next layer
    cos: torch.Tensor  # [B, L, head_dim] rotary cos, computed once from the ORIGINAL positions
    sin: torch.Tensor  # [B, L, head_dim] rotary sin
    valid: torch.Tensor  # [B, L] bool, False at padding
    visual: torch.Tensor  # [B, L] bool, True at visual tokens still present
    source_index: torch.Tensor  # [B, L] int64 position of each token in the original prefill
    # [B, L, K, D] added to the residual stream after layers 0..K-1 (Qwen3-VL DeepStack), zero at
    # tokens that get nothing; None once the last addition is made, or for families without any.
    additions: torch.Tensor | None = None

    def gather(self, index: torch.Tensor, index_valid: torch.Tensor) -> TokenState:
        """Tokens at `index` ([B, L'] int64); slots where `index_valid` is False become padding."""
        gathered = {f.name: _gather_tokens(getattr(self, f.name), index) for f in fields(self)}
        gathered["valid"] = gathered["valid"] & index_valid
        gathered["visual"] = gathered["visual"] & index_valid
        return replace(self, **gathered)

    def num_visual(self) -> torch.Tensor:
        """[B] int64 visual tokens still present per sample."""
        return self.visual.sum(dim=1)


def _gather_tokens(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """Gather along dim 1 with a per-row index, for [B, L] or [B, L, ...] tensors."""
    if tensor is None:
        return None
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(
        *index.shape, *tensor.shape[2:]
    )
    return torch.gather(tensor, 1, expanded)
