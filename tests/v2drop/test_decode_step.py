"""A V²Drop decode step costs the GPU no more than a stock one: no extra host-device sync and
at most 2 % more operator calls, counted at torch's dispatcher on CPU (bench/op_counts.py).

Before v2drop.key_masks, every stage of the dropped cache built its mask through transformers,
which asks the GPU whether the mask is all ones: 4 syncs per step instead of the stock 0-1.
Real depth (28 layers): the per-step overhead is fixed, so its share depends on the depth.
"""

from __future__ import annotations

import pytest
import torch

import v2drop
from bench.op_counts import decode_step_counts, prefill_counts
from v2drop import key_masks
from vlm import testing as models

NUM_LAYERS = 28
MAX_EXTRA_OP_CALLS = 0.02


def _visual(family: str, frames: int = 2) -> models.Visual:
    return models.Visual("video", (frames, 0, 0) if family == "llava_onevision" else (frames, 8, 8))


CASES = [
    pytest.param("qwen2_5_vl", ["Describe."], id="qwen2_5_vl-batch1-unpadded"),
    pytest.param("qwen2_5_vl", ["Describe.", "What happens in this long clip here?"], id="qwen2_5_vl-padded"),
    pytest.param("qwen3_vl", ["Describe.", "What happens in this long clip here?"], id="qwen3_vl-padded"),
    pytest.param("llava_onevision", ["Describe."], id="llava_onevision-batch1-unpadded"),
]


@pytest.mark.parametrize("family, questions", CASES)
def test_v2drop_decode_step_adds_no_sync_and_at_most_2pct_op_calls(family, questions):
    model = models.model(family, num_layers=NUM_LAYERS)
    inputs = models.batch(family, [models.Sample(q, _visual(family)) for q in questions])
    stock = decode_step_counts(model, inputs)
    v2drop.enable(model, v2drop.Schedule.for_retention(NUM_LAYERS, 0.25))
    dropped = decode_step_counts(model, inputs)

    assert dropped.syncs <= stock.syncs, (stock.by_op, dropped.by_op)
    assert dropped.op_calls <= (1 + MAX_EXTRA_OP_CALLS) * stock.op_calls, (stock.as_dict(), dropped.as_dict())
    assert stock.op_calls > 20 * NUM_LAYERS  # the counter saw the whole step


def test_additive_key_mask_is_causal_over_new_tokens_and_masks_padding():
    # cached 3 (first one padding), 2 new tokens: query 0 sees keys 1..3, query 1 sees keys 1..4
    valid = torch.tensor([[False, True, True, True, True]])
    mask = key_masks.additive_key_mask(valid, num_new=2, dtype=torch.float32)
    visible = (mask == 0)[0, 0]
    assert visible.tolist() == [[False, True, True, True, False], [False, True, True, True, True]]
    assert mask.min() == torch.finfo(torch.float32).min


def test_single_token_mask_broadcasts_over_queries():
    valid = torch.tensor([[True, False, True], [True, True, True]])
    mask = key_masks.additive_key_mask(valid, num_new=1, dtype=torch.bfloat16)
    assert mask.shape == (2, 1, 1, 3) and mask.dtype == torch.bfloat16
    assert (mask == 0)[:, 0, 0].tolist() == valid.tolist()


@pytest.mark.parametrize("family, questions", CASES)
def test_v2drop_prefill_makes_at_most_one_sync_more_than_stock(family, questions):
    """The host follows every prefill shape from one read of the rows' token counts
    (`v2drop.loop.RowCounts`), so no drop waits for the GPU, and a padded drop stage builds its
    own mask instead of letting transformers ask whether it holds padding. Counted with host
    reads included (`tolist` too), 28 layers, 3 drops (stock -> V²Drop): before, 19 -> 31 and
    3 -> 15 unpadded, 26 -> 48 and 32 -> 54 padded; after, 19 -> 19, 3 -> 3, 26 -> 27, 32 -> 33."""
    model = models.model(family, num_layers=NUM_LAYERS)
    inputs = models.batch(family, [models.Sample(q, _visual(family)) for q in questions])
    stock = prefill_counts(model, inputs)
    v2drop.enable(model, v2drop.Schedule.for_retention(NUM_LAYERS, 0.25))
    dropped = prefill_counts(model, inputs)
    assert dropped.syncs <= stock.syncs + 1, (stock.as_dict(), dropped.as_dict())
    assert v2drop.last_stats(model)[0]["retention"] < 0.5  # it did drop
