import torch

from v2drop.schedule import keep_count
from v2drop.select import RowCounts, compact, keep_counts, select_visual, variation_scores


def test_scores_are_float32_l2_norms_of_the_update():
    now = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]], dtype=torch.bfloat16)
    prev = torch.zeros_like(now)
    scores = variation_scores(now, prev)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([[5.0, 2 ** 0.5]]))


def test_each_row_gets_its_own_top_k():
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.5, 9.0], [0.9, 0.1, 0.2, 0.7, 9.0]])
    visual = torch.tensor([[False, True, True, True, False], [True, True, True, True, False]])
    kept = select_visual(scores, visual, torch.tensor([2, 1]))
    assert kept.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    visual = torch.ones(1, 4, dtype=torch.bool)
    assert select_visual(scores, visual, torch.tensor([2])).tolist() == [[True, True, False, False]]


def test_text_tokens_are_never_selected_even_with_huge_scores():
    scores = torch.tensor([[100.0, 0.0, 0.0]])
    visual = torch.tensor([[False, True, True]])
    assert select_visual(scores, visual, torch.tensor([2])).tolist() == [[False, True, True]]


def test_compact_left_pads_and_keeps_order():
    keep = torch.tensor([[True, False, True, True], [False, False, True, True]])
    index, valid = compact(keep, new_len=3)
    assert index.tolist() == [[0, 2, 3], [1, 2, 3]]
    assert valid.tolist() == [[True, True, True], [False, True, True]]


def test_keep_counts_floor_per_sample():
    assert keep_counts(torch.tensor([10, 7, 0]), 0.5).tolist() == [5, 3, 0]


def test_device_keep_counts_equal_the_hosts_for_every_count_and_schedule_keep():
    """The host sizes each drop from `keep_count` and never asks the device, so the device's
    counts must be the same integers, including at exact products such as 0.3 * 10 (2.9999...)."""
    visual = torch.arange(0, 4097)
    for keep in (0.0, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.9, 1.0):
        host = [keep_count(n, keep) for n in visual.tolist()]
        assert keep_counts(visual, keep).tolist() == host, keep


def test_row_counts_follow_a_drop_on_the_host():
    valid = torch.tensor([[True, True, True, True, True], [False, True, True, True, True]])
    visual = torch.tensor([[False, True, True, True, True], [False, False, True, True, True]])
    counts = RowCounts.of(valid, visual)
    assert (counts.text, counts.visual) == ((1, 1), (4, 3))
    assert counts.padded(5) and counts.longest() == 5
    half = counts.after_drop(0.5)
    assert (half.text, half.visual, half.longest()) == ((1, 1), (2, 1), 3)
    assert half.padded(3) and not RowCounts((1, 1), (2, 2)).padded(3)
