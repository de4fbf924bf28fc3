"""V²Drop scoring and selection as small pure tensor functions (no transformers import).

Shapes: B = batch, L = current sequence length, D = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v2drop.schedule import FLOOR_EPS, keep_count


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
    """floor(n * keep) per sample, on the device and without a host sync. num_visual: [B] int ->
    [B] int64. The same float64 arithmetic as `schedule.keep_count`, so the counts the host keeps
    for the shapes (`v2drop.loop.RowCounts`) equal these, bit for bit."""
    counts = torch.floor(num_visual.double() * keep + FLOOR_EPS).long()
    return torch.minimum(counts.clamp(min=0), num_visual.long())


@dataclass(frozen=True)
class RowCounts:
    """Per-row token counts the host follows through the drops, so that no drop asks the GPU how
    long the kept sequence is (`keep_counts` gives the device the same numbers)."""

    text: tuple[int, ...]  # real non-visual tokens per row (never dropped)
    visual: tuple[int, ...]  # visual tokens still present per row

    @classmethod
    def of(cls, valid: torch.Tensor, visual: torch.Tensor) -> RowCounts:
        """The prefill's one host-device sync. valid, visual: [B, L] bool."""
        text, present = torch.stack([(valid & ~visual).sum(dim=1), (visual & valid).sum(dim=1)]).tolist()
        return cls(tuple(text), tuple(present))

    def after_drop(self, keep: float) -> RowCounts:
        return RowCounts(self.text, tuple(keep_count(n, keep) for n in self.visual))

    def longest(self) -> int:
        return max((t + v for t, v in zip(self.text, self.visual)), default=0)

    def padded(self, length: int) -> bool:
        """True when some row holds fewer real tokens than `length` columns."""
        return any(t + v < length for t, v in zip(self.text, self.visual))


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


def compact(keep: torch.Tensor, new_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that pack each row's kept tokens to the right, in original order.

    keep: [B, L] bool; new_len: the most tokens any row keeps, which the caller knows on the host
    (asking the GPU would stall it once per drop). Returns (index [B, new_len], valid
    [B, new_len] bool). Rows with fewer kept tokens are left-padded, matching the left padding
    that generation uses, so every row's last real token stays in the last column. Padding
    slots point at some dropped token and are marked invalid.

    Example: keep [[T, F, T, T], [F, F, T, T]], new_len 3 -> index [[0, 2, 3], [1, 2, 3]],
    valid [[T, T, T], [F, T, T]].
    """
    # A stable ascending sort of 0/1 puts dropped tokens first and kept ones last, each group
    # in original order; the last new_len columns are then exactly the left-padded layout.
    values, index = torch.sort(keep.to(torch.uint8), dim=1, stable=True)
    return index[:, keep.shape[1] - new_len :], values[:, keep.shape[1] - new_len :].bool()
