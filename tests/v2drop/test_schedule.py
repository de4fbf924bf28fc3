import pytest

from v2drop import Schedule
from v2drop.schedule import keep_count


@pytest.mark.parametrize(
    "layers, keep, num_layers, expected",
    [
        ((3, 16, 22), (0.25, 0.5, 0.0), 28, 0.25),  # 28-layer video model, 25 % target
        ((3, 16, 22), (0.25, 0.05, 0.0), 28, 0.2259),  # Qwen2-VL-7B released code
        ((3, 17, 22), (0.5, 0.3, 0.0), 32, 0.3359),  # LLaVA-1.5-7B "192 of 576"
        ((3, 17, 22), (0.28, 0.25, 0.0), 32, 0.2272),  # "128 of 576"
    ],
)
def test_layer_averaged_retention_matches_the_published_table(layers, keep, num_layers, expected):
    assert Schedule(layers, keep).retention(num_layers) == pytest.approx(expected, abs=6e-4)


def test_published_64_of_576_uses_integer_token_counts():
    # 576 -> 28 -> 1 -> 0: with floor rounding 11.5 %, as published (11.6 % without rounding).
    counts = Schedule((3, 17, 22), (0.05, 0.05, 0.0)).tokens_per_layer(576, 32)
    assert sum(counts) / (32 * 576) == pytest.approx(0.1153, abs=1e-4)


def test_layer_averaged_tokens_of_llava_192_of_576():
    counts = Schedule((3, 17, 22), (0.5, 0.3, 0.0)).tokens_per_layer(576, 32)
    assert counts[:3] == [576] * 3 and counts[3] == 288 and counts[17] == 86 and counts[22] == 0
    assert round(sum(counts) / 32) == 193


@pytest.mark.parametrize("num_layers", [4, 8, 12, 24, 28, 32, 36, 48, 80])
@pytest.mark.parametrize("retention", [0.2, 0.25, 0.3, 0.5])
def test_solver_hits_the_target_for_any_depth(num_layers, retention):
    try:
        schedule = Schedule.for_retention(num_layers=num_layers, retention=retention)
    except ValueError as error:
        assert "cannot be reached" in str(error)
        return
    assert schedule.retention(num_layers) == pytest.approx(retention)
    assert all(0.0 <= k <= 1.0 for k in schedule.keep)


def test_default_shape_for_28_layers_is_the_papers_video_schedule():
    schedule = Schedule.for_retention(num_layers=28, retention=0.25)
    assert schedule.layers == (3, 16, 22)
    assert schedule.keep == pytest.approx((0.25, 0.5, 0.0))


def test_retention_one_is_the_identity_schedule():
    schedule = Schedule.for_retention(num_layers=28, retention=1.0)
    assert schedule.is_identity and schedule.retention(28) == 1.0


@pytest.mark.parametrize("retention", [0.05, 0.9, 0.0, 1.5, -0.1])
def test_unreachable_or_invalid_retention_is_refused(retention):
    with pytest.raises(ValueError, match="retention"):
        Schedule.for_retention(num_layers=28, retention=retention)


@pytest.mark.parametrize(
    "layers, keep, message",
    [
        ((3, 16), (0.5,), "one keep per drop layer"),
        ((3, 16), (0.5, 1.5), r"\[0, 1\]"),
        ((3, 16), (-0.1, 0.5), r"\[0, 1\]"),
        ((16, 3), (0.5, 0.5), "strictly increasing"),
        ((3, 3), (0.5, 0.5), "strictly increasing"),
        ((0, 3), (0.5, 0.5), ">= 1"),
    ],
)
def test_bad_schedules_name_the_problem(layers, keep, message):
    with pytest.raises(ValueError, match=message):
        Schedule(layers, keep)


def test_drop_layer_out_of_range_for_the_depth():
    with pytest.raises(ValueError, match=r"out of range.*28 decoder layers"):
        Schedule((3, 30), (0.5, 0.5)).retention(28)


def test_keep_count_is_floor_with_exact_decimals():
    assert keep_count(100, 0.29) == 29  # naive float floor gives 28
    assert keep_count(7, 0.5) == 3
    assert keep_count(10, 0.0) == 0
    assert keep_count(10, 1.0) == 10
