import torch

from v2drop.select import compact, keep_counts, select_visual, variation_scores


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
    index, valid, padded = compact(keep)
    assert index.tolist() == [[0, 2, 3], [1, 2, 3]]
    assert valid.tolist() == [[True, True, True], [False, True, True]]
    assert padded
    assert compact(torch.tensor([[True, False, True], [False, True, True]]))[2] is False


def test_keep_counts_floor_per_sample():
    assert keep_counts(torch.tensor([10, 7, 0]), 0.5).tolist() == [5, 3, 0]
