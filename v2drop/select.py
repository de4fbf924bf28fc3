"""V²Drop scoring and selection as small pure tensor functions (no transformers import).

Shapes: B = batch, L = current sequence length, D = hidden size.
"""

from __future__ import annotations

import torch

from v2drop.schedule import keep_count


def variation_scores(hidden_now: torch.Tensor, hidden_prev: torch.Tensor) -> torch.Tensor:
    """||H[i] - H[i-1]||_2 per token, in float32.

    hidden_now, hidden_prev: [B, L, D], the residual stream entering layers i and i-1 for the
    same tokens. Returns [B, L] float32. float32 because in bf16 the small updates that separate
    "lazy" tokens from active ones round to the same value and ties take over.
    """
    return (hidden_now.float() - hidden_prev.float()).norm(dim=-1)


def random_scores(hidden_now: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores [B, L]: the control every scoring method must beat."""
    return torch.rand(hidden_now.shape[:2], generator=generator, device=generator.device)


def keep_counts(num_visual: torch.Tensor, keep: float) -> torch.Tensor:
    """floor(n * keep) per sample. num_visual: [B] int -> [B] int64 (on the same device)."""
    counts = [keep_count(int(n), keep) for n in num_visual.tolist()]
    return torch.tensor(counts, dtype=torch.long, device=num_visual.device)


def select_visual(scores: torch.Tensor, visual: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per sample, the k[b] visual tokens with the largest score.

    scores: [B, L] float; visual: [B, L] bool; k: [B] int64 with k[b] <= visual[b].sum().
    Returns [B, L] bool, True at kept visual tokens. Ties go to the lower index (stable sort),
    so two runs keep the same tokens. Each row gets its own top-k: batching never mixes rows.

    Example: scores [[.1, .9, .9, .5]], visual [[F, T, T, T]], k [2] -> [[F, T, T, F]].
    """
    masked = scores.masked_fill(~visual, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices  # [B, L]
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank.scatter_(1, order, positions)  # rank[b, t] = place of token t in row b's ordering
    return visual & (rank < k[:, None])


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Gather indices that pack each row's kept tokens to the right, in original order.

    keep: [B, L] bool. Returns (index [B, L'], valid [B, L'] bool, padded) with L' = max kept per
    row and `padded` True when some row keeps fewer (one host-device sync gives both numbers).
    Rows with fewer kept tokens are left-padded, matching the left padding that generation
    uses, so every row's last real token stays in the last column. Padding slots point at
    some dropped token and are marked invalid.

    Example: keep [[T, F, T, T], [F, F, T, T]] -> index [[0, 2, 3], [1, 2, 3]],
    valid [[T, T, T], [F, T, T]], padded True.
    """
    kept_per_row = keep.sum(dim=1)
    new_len, fewest = torch.stack([kept_per_row.max(), kept_per_row.min()]).tolist() if keep.shape[0] else (0, 0)
    # A stable ascending sort of 0/1 puts dropped tokens first and kept ones last, each group
    # in original order; the last new_len columns are then exactly the left-padded layout.
    values, index = torch.sort(keep.to(torch.uint8), dim=1, stable=True)
    return index[:, keep.shape[1] - new_len :], values[:, keep.shape[1] - new_len :].bool(), fewest < new_len
