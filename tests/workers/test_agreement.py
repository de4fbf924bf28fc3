"""workers.agreement: the shadow's measures on known pairs, worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from workers import agreement


def test_the_worked_example_of_the_module_docstring() -> None:
    full, dropped = "a red car parks", "A blue car parks here"
    assert agreement.text_measures(full, dropped) == {
        "shadow_exact_match": False,
        "shadow_token_f1": pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4)),
        "shadow_lcs_ratio": pytest.approx(6 / 9),
        "shadow_first_diff_word": 1,
    }


def test_equal_outputs_agree_fully_and_have_no_first_difference() -> None:
    for text in ("The cat sits.", "", None):
        measures = agreement.text_measures(text, text)
        assert measures == {"shadow_exact_match": True, "shadow_token_f1": 1.0, "shadow_lcs_ratio": 1.0,
                            "shadow_first_diff_word": None}


def test_order_counts_for_lcs_but_not_for_f1() -> None:
    assert agreement.token_f1("b a", "a b") == 1.0
    assert agreement.lcs_ratio("b a", "a b") == pytest.approx(2 * 1 / 4)
    assert agreement.lcs_length("a b c d e".split(), "x b y d e".split()) == 3


def test_a_prefix_differs_where_the_shorter_output_ends_and_disjoint_outputs_score_zero() -> None:
    assert agreement.first_diff_word("a b c", "a b") == 2
    assert agreement.first_diff_word("", "a") == 0
    assert agreement.token_f1("a b", "c d") == 0.0 and agreement.lcs_ratio("a b", "") == 0.0
    assert agreement.exact_match(" a b ", "a b") and not agreement.exact_match("a b", "a  b")


def test_first_token_top1_and_kl_on_two_token_distributions() -> None:
    full = torch.log(torch.tensor([[0.5, 0.5], [0.8, 0.2], [0.3, 0.7]]))
    dropped = torch.log(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]]))
    assert agreement.top1_agree(full[1:], dropped[1:]) == [True, False]
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl = agreement.kl_full_dropped(full, dropped)
    assert kl[0] == pytest.approx(expected, rel=1e-5) and kl[1] == 0.0 and kl[2] > 0
    assert agreement.kl_full_dropped(dropped[:1], full[:1])[0] != pytest.approx(expected)  # KL is not symmetric
