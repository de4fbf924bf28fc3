"""Clip planning: spans, truncation, minimum length, cap, and deterministic ids."""

import itertools

import pytest

from pipeline.clips import ClipSpec, clip_id, iter_clips, plan_clips

URI = "s3://bucket/videos/a.mp4"


def spans(clips: list[ClipSpec]) -> list[tuple[float, float]]:
    return [(c.start_s, c.end_s) for c in clips]


def plan(duration_s: float, **overrides) -> list[ClipSpec]:
    args = dict(clip_len_s=10.0, stride_s=10.0, min_clip_len_s=2.0) | overrides
    return plan_clips(URI, duration_s, **args)


def test_fixed_stride_truncates_the_last_span_to_the_video_end():
    clips = plan(25.0)
    assert spans(clips) == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert [c.clip_index for c in clips] == [0, 1, 2]
    assert clips[-1].duration_s == 5.0


def test_stride_shorter_than_clip_overlaps_and_stops_at_the_first_span_reaching_the_end():
    # [20, 25) would lie inside [15, 25): no sub-span of an earlier clip is planned
    assert spans(plan(25.0, stride_s=5.0)) == [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0), (15.0, 25.0)]


def test_stride_longer_than_clip_leaves_gaps():
    assert spans(plan(40.0, clip_len_s=5.0, stride_s=15.0)) == [(0.0, 5.0), (15.0, 20.0), (30.0, 35.0)]


def test_a_tail_shorter_than_min_clip_len_is_dropped():
    assert spans(plan(21.5)) == [(0.0, 10.0), (10.0, 20.0)]
    assert spans(plan(22.0)) == [(0.0, 10.0), (10.0, 20.0), (20.0, 22.0)]  # exactly the minimum stays


def test_a_video_shorter_than_min_clip_len_is_one_clip_of_its_whole_length():
    assert spans(plan(1.0)) == [(0.0, 1.0)]
    assert spans(plan(0.1)) == [(0.0, 0.1)]
    assert spans(plan(1.0, min_clip_len_s=0.5)) == [(0.0, 1.0)]
    assert plan(0.0) == []  # only a video of no duration has nothing to caption


def test_max_clips_caps_the_plan():
    assert spans(plan(100.0, max_clips=3)) == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
    assert len(plan(100.0, max_clips=50)) == 10


def test_float_strides_do_not_accumulate_rounding_error():
    clips = plan(1.0, clip_len_s=0.1, stride_s=0.1, min_clip_len_s=0.1)
    assert spans(clips)[3] == (0.3, 0.4)
    assert len(clips) == 10


def test_ids_are_deterministic_and_pinned():
    first, again = plan(25.0), plan(25.0)
    assert [c.clip_id for c in first] == [c.clip_id for c in again]
    assert len({c.clip_id for c in first}) == 3
    # resume depends on this exact value: a change here re-runs every finished clip
    assert clip_id(URI, 0.0, 10.0) == first[0].clip_id == "0b8fb38a-122a-5a6e-9370-b87f3724c6c2"


def test_ids_change_with_video_span_and_settings():
    base = plan(25.0)[0].clip_id
    assert plan_clips("s3://bucket/videos/b.mp4", 25.0, clip_len_s=10, stride_s=10, min_clip_len_s=2)[0].clip_id != base
    assert plan(25.0, clip_len_s=9.0)[0].clip_id != base
    assert plan(25.0, settings_key="num_frames=16")[0].clip_id != base
    assert plan(25.0, settings_key="num_frames=8")[0].clip_id != plan(25.0, settings_key="num_frames=16")[0].clip_id


def test_a_two_hour_video_is_planned_as_numbers_and_lazily():
    clips = plan(2 * 3600.0)
    assert len(clips) == 720 and spans(clips)[-1] == (7190.0, 7200.0)
    lazy = iter_clips(URI, 1e9, clip_len_s=10, stride_s=10, min_clip_len_s=2)  # 1e8 clips: never listed
    assert [c.start_s for c in itertools.islice(lazy, 3)] == [0.0, 10.0, 20.0]


@pytest.mark.parametrize(
    "overrides, argument",
    [
        (dict(duration_s=-1.0), "duration_s"),
        (dict(duration_s=float("nan")), "duration_s"),
        (dict(clip_len_s=0.0), "clip_len_s"),
        (dict(stride_s=-5.0), "stride_s"),
        (dict(min_clip_len_s=11.0), "min_clip_len_s"),
        (dict(min_clip_len_s=-1.0), "min_clip_len_s"),
        (dict(max_clips=0), "max_clips"),
        (dict(max_clips=2.5), "max_clips"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(overrides, argument):
    args = dict(duration_s=30.0, clip_len_s=10.0, stride_s=10.0, min_clip_len_s=2.0) | overrides
    duration_s = args.pop("duration_s")
    with pytest.raises(ValueError, match=argument):
        plan_clips(URI, duration_s, **args)
