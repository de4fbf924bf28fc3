"""How far a dropped output is from the full-token one: small pure measures, no model.

Text measures work on words: lower-cased, whitespace-separated (`words`). Two empty outputs
agree fully (1.0): neither model said anything. Worked example, full "a red car parks" vs
dropped "a blue car parks here":

    exact_match       False
    token_f1          common words {a, car, parks} = 3; precision 3/5, recall 3/4 -> 0.667
    lcs_ratio         longest common subsequence [a, car, parks] = 3; 2*3 / (4+5) -> 0.667
    first_diff_word   1 (word 0 agrees, word 1 is 'red' vs 'blue'); None when the words agree

The first-token measures compare the two next-token distributions after the prompt (raw logits,
before any sampling processor): whether their top-1 tokens agree, and KL(full || dropped) in
nats, computed in float32 from log-softmax so a token the dropped model all but rules out gives
a large, finite value.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch


def words(text: str | None) -> list[str]:
    return (text or "").lower().split()


def exact_match(full: str | None, dropped: str | None) -> bool:
    """Same text after trimming surrounding whitespace."""
    return (full or "").strip() == (dropped or "").strip()


def token_f1(full: str | None, dropped: str | None) -> float:
    """Bag-of-words F1 (SQuAD style): overlap counted with multiplicity."""
    a, b = words(full), words(dropped)
    if not a and not b:
        return 1.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(b), common / len(a)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence of two word lists, O(len(a) * len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def lcs_ratio(full: str | None, dropped: str | None) -> float:
    """2 * LCS / (words in full + words in dropped): order-aware, 1.0 only for the same words in order."""
    a, b = words(full), words(dropped)
    if not a and not b:
        return 1.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def first_diff_word(full: str | None, dropped: str | None) -> int | None:
    """Index of the first word where the outputs differ; None when all words agree.
    One output a prefix of the other differs at the shorter one's length."""
    a, b = words(full), words(dropped)
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def top1_agree(full_logits: torch.Tensor, dropped_logits: torch.Tensor) -> list[bool]:
    """Per row of [B, V] logits: do both models rank the same token first?"""
    return (full_logits.argmax(dim=-1) == dropped_logits.argmax(dim=-1)).tolist()


def kl_full_dropped(full_logits: torch.Tensor, dropped_logits: torch.Tensor) -> list[float]:
    """Per row of [B, V] logits: KL(full || dropped) = sum_v p_full(v) * (log p_full(v) - log p_dropped(v)),
    in nats; 0 for identical distributions, never negative."""
    log_full = torch.log_softmax(full_logits.float(), dim=-1)
    log_dropped = torch.log_softmax(dropped_logits.float(), dim=-1)
    kl = (log_full.exp() * (log_full - log_dropped)).sum(dim=-1)
    return [max(0.0, float(value)) for value in kl]  # rounding can leave -1e-9 for equal rows


def text_measures(full: str | None, dropped: str | None) -> dict[str, object]:
    """The row columns of the text measures (pipeline.schema: shadow_*)."""
    return {
        "shadow_exact_match": exact_match(full, dropped),
        "shadow_token_f1": token_f1(full, dropped),
        "shadow_lcs_ratio": lcs_ratio(full, dropped),
        "shadow_first_diff_word": first_diff_word(full, dropped),
    }
