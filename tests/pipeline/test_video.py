"""Probe and clip decoding on the shared real samples and on broken files the tests make.

Real samples live in ../shared/videos (see its README). Every decode runs in the helper process,
so these tests also exercise the timeout/kill/restart path for real.
"""

import dataclasses
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline import decoders, frame_sampling, video
from pipeline.clips import plan_clips
from pipeline.video import DecoderProcess, DecodeTimeout, VideoError, decode_clip, probe

SAMPLES = Path(__file__).parents[2].parent / "shared" / "videos"


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / "nasa_13013.mp4").is_file():
        pytest.fail(f"sample videos not found in {SAMPLES}: these tests need the shared folder ../shared/videos")
    return SAMPLES


def write_video(path: Path, frames: list[np.ndarray], *, codec: str, fps: int, rotation_ccw_deg: int = 0,
                lossless: bool = True) -> Path:
    """Encode RGB frames with PyAV; `rotation_ccw_deg` writes a display-matrix rotation tag.
    x264 encodes losslessly unless told not to (lossless x264 makes no B-frames)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264" and lossless:
            stream.options = {"qp": "0"}  # lossless in YUV: pixel values stay readable
        if rotation_ccw_deg:
            stream.set_display_rotation(rotation_ccw_deg)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ------------------------------------------------------------------ probe

@pytest.mark.parametrize(
    "name, duration_s, fps, num_frames, width, height, codec, rotation_deg",
    [
        ("nasa_13013.mp4", 13.0, 29.97, 390, 480, 270, "h264", 0),  # the 480x270 stream, not the 320x180 one
        ("flipping_a_pancake.mkv", 10.3, 30.0, 310, 426, 240, "h264", 0),  # MKV stores no count: counted
        ("h265_video.mp4", 1.0, 10.0, 10, 128, 128, "hevc", 0),
        ("video_90.mov", 0.1, 30.0, 3, 320, 568, "h264", 90),  # stored 568x320, displayed upright
        ("corrupted.mp4", 5.0, 10.0, 50, 1280, 720, "h264", 0),  # metadata is intact; the damage is in the data
    ],
)
def test_probe_reports_displayed_geometry_of_each_sample(samples, name, duration_s, fps, num_frames, width, height, codec, rotation_deg):
    info = probe(str(samples / name))
    assert info.duration_s == pytest.approx(duration_s, abs=0.1)
    assert info.fps == pytest.approx(fps, abs=0.01)
    assert (info.num_frames, info.width, info.height) == (num_frames, width, height)
    assert (info.codec, info.rotation_deg) == (codec, rotation_deg)
    assert info.size_bytes == (samples / name).stat().st_size
    assert info.uri == str(samples / name)


# ------------------------------------------------------------------ decode: clean samples, both decoders

def test_a_header_duration_the_frames_cannot_be_gives_way_to_their_span(samples):
    info = probe(str(samples / "flipping_a_pancake.mkv"))  # 310 frames at 30 fps
    damaged = [dataclasses.replace(info, duration_s=d) for d in (1e9, -10.0, float("nan"))]
    assert [decoders.plausible_duration(d) for d in damaged] == [pytest.approx(310 / 30)] * 3
    assert decoders.plausible_duration(dataclasses.replace(info, duration_s=12.0)) == 12.0  # within twice the span
    with pytest.raises(VideoError, match="impossible duration"):
        decoders.plausible_duration(dataclasses.replace(info, duration_s=-1.0, fps=0.0))


def test_a_stream_that_starts_later_than_0_is_timed_from_its_first_frame_by_both_decoders(samples, tmp_path):
    """A cut file or an MPEG-TS stream: its timestamps start at 5 s here. The clip plan counts
    from the first frame, as decord does; PyAV reads the stream's own clock."""
    import av

    shifted = {}
    for ext in ("mp4", "mkv"):
        shifted[ext] = tmp_path / f"later.{ext}"
        with av.open(str(samples / "nasa_13013.mp4")) as source, av.open(str(shifted[ext]), "w") as out:
            stream = source.streams.best("video")
            copy = out.add_stream_from_template(stream)
            for packet in source.demux(stream):
                if packet.dts is not None:
                    packet.pts, packet.dts, packet.stream = packet.pts + 5 * 30000, packet.dts + 5 * 30000, copy
                    out.mux(packet)
    for ext, path in shifted.items():
        assert probe(str(path)).duration_s == pytest.approx(13.0, abs=0.1), ext
        for start_s, end_s in ((0.0, 10.0), (10.0, 13.0)):
            clips = {name: decode_clip(str(path), start_s, end_s, num_frames=4, max_pixels=64 * 64, decoder=name)
                     for name in ("pyav", "decord")}
            assert clips["pyav"].timestamps_s == pytest.approx(clips["decord"].timestamps_s, abs=1e-3), (ext, start_s)
            assert clips["pyav"].timestamps_s[0] >= start_s and not clips["pyav"].partial
            assert mean_abs_diff(clips["pyav"].frames, clips["decord"].frames) < 1.0


@pytest.mark.parametrize(
    "name, start_s, end_s",
    [("nasa_13013.mp4", 2.0, 12.0), ("flipping_a_pancake.mkv", 0.0, 10.0), ("h265_video.mp4", 0.0, 1.0)],
)
def test_decord_and_pyav_return_the_same_frames(samples, name, start_s, end_s):
    path = str(samples / name)
    by_decord = decode_clip(path, start_s, end_s, num_frames=8, decoder="decord")
    by_pyav = decode_clip(path, start_s, end_s, num_frames=8, decoder="pyav")
    assert (by_decord.decoder, by_pyav.decoder) == ("decord", "pyav")
    assert by_decord.frames.dtype == np.uint8 and by_decord.frames.shape[0] == 8
    assert by_decord.frames.shape == by_pyav.frames.shape
    assert by_decord.timestamps_s == pytest.approx(by_pyav.timestamps_s, abs=1e-3)
    assert all(start_s <= t < end_s for t in by_decord.timestamps_s)
    assert mean_abs_diff(by_decord.frames, by_pyav.frames) < 2.0
    assert not by_decord.partial and by_decord.error is None


def test_auto_prefers_pyav_and_samples_evenly(samples):
    clip = decode_clip(str(samples / "nasa_13013.mp4"), 0.0, 10.0, num_frames=4)
    assert clip.decoder == "pyav"  # the least CPU time per clip (pipeline.decoders)
    # bin midpoints 1.25, 3.75, 6.25, 8.75 s; nearest frames of a 29.97 fps video
    assert clip.timestamps_s == pytest.approx([1.25, 3.75, 6.25, 8.75], abs=1 / 29.97 / 2 + 1e-6)


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_the_thread_count_changes_no_frame(samples, decoder):
    """A decode task's decoder runs as many threads as the task holds CPUs (decode.num_cpus); the
    frames are the same on one thread or several."""
    path = str(samples / "flipping_a_pancake.mkv")
    one, two = (decode_clip(path, 2.0, 7.0, num_frames=6, decoder=decoder, threads=n) for n in (1, 2))
    assert one.timestamps_s == two.timestamps_s and np.array_equal(one.frames, two.frames)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        decode_clip(path, 2.0, 7.0, threads=0)


def test_reference_frames_only_samples_the_nearest_reference_frame(tmp_path):
    """decode.reference_frames_only: PyAV skips the frames no other frame refers to (x264's
    non-reference B-frames here); each sample takes the nearest decoded frame, at most two frame
    periods from the one a full decode gives, with the same pixels where it is the same frame.
    decord cannot skip and decodes every frame, as before."""
    texture = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    frames = [np.roll(texture, 2 * i, axis=1) for i in range(90)]  # 3 s at 30 fps, moving
    path = str(write_video(tmp_path / "b_frames.mp4", frames, codec="libx264", fps=30, lossless=False))
    full = decode_clip(path, 0.0, 3.0, num_frames=16, decoder="pyav")
    ref = decode_clip(path, 0.0, 3.0, num_frames=16, decoder="pyav", reference_frames_only=True)
    assert ref.frames.shape == full.frames.shape and not ref.partial
    moved = np.abs(np.array(ref.timestamps_s) - full.timestamps_s)
    assert 0 < moved.max() <= 2 / 30 + 1e-6  # some samples moved: frames were skipped
    kept = moved == 0
    assert kept.any() and np.array_equal(ref.frames[kept], full.frames[kept])
    by_decord = decode_clip(path, 0.0, 3.0, num_frames=16, decoder="decord", reference_frames_only=True)
    assert by_decord.timestamps_s == pytest.approx(full.timestamps_s, abs=1e-3)


def test_fps_sampling_wins_over_num_frames(samples):
    clip = decode_clip(str(samples / "flipping_a_pancake.mkv"), 1.0, 3.0, num_frames=16, fps=2.0)
    assert clip.timestamps_s == pytest.approx([1.25, 1.75, 2.25, 2.75], abs=0.02)


def test_rotated_phone_video_comes_out_upright_from_both_decoders(samples):
    path = str(samples / "video_90.mov")
    by_decord = decode_clip(path, 0.0, 0.1, num_frames=3, decoder="decord")
    by_pyav = decode_clip(path, 0.0, 0.1, num_frames=3, decoder="pyav")
    # decord applies the tag itself; PyAV's frames are rotated by our numpy code: same result
    assert by_decord.frames.shape == by_pyav.frames.shape == (3, 568, 320, 3)  # H=568, W=320 as displayed
    assert mean_abs_diff(by_decord.frames, by_pyav.frames) < 1.0
    info = probe(path)
    assert (info.height, info.width) == by_pyav.frames.shape[1:3]


@pytest.mark.parametrize("rotation_ccw_deg", [90, 180, 270])
def test_every_rotation_tag_gives_the_same_picture_from_both_decoders(tmp_path, rotation_ccw_deg):
    picture = np.zeros((64, 128, 3), np.uint8)  # decord2 3.4 cannot turn some tinier frames (next test)
    picture[:32, :64] = 255  # a white top-left quadrant shows which way the frame turned
    path = write_video(tmp_path / "rot.mp4", [picture] * 4, codec="libx264", fps=10, rotation_ccw_deg=rotation_ccw_deg)
    expected = np.rot90(picture, k=rotation_ccw_deg // 90)  # what a player shows
    for decoder in decoders.DECODERS:
        clip = decode_clip(str(path), 0.0, 0.4, num_frames=2, decoder=decoder)
        assert clip.frames.shape[1:] == expected.shape, decoder
        assert mean_abs_diff(clip.frames[0], expected) < 3.0, decoder
    info = probe(str(path))
    assert info.rotation_deg == (-rotation_ccw_deg) % 360
    assert (info.height, info.width) == expected.shape[:2]


@pytest.mark.parametrize("rotation_ccw_deg", [90, 270])
def test_a_tiny_rotated_video_decord2_cannot_turn_still_comes_out_upright(tmp_path, rotation_ccw_deg):
    """decord2 3.4 fails to copy out 64x32 frames with a 90/270 rotation tag (decord 0.6.0 did not);
    it raises rather than returning wrong pixels, so 'auto' falls back to PyAV."""
    picture = np.zeros((32, 64, 3), np.uint8)
    picture[:16, :32] = 255
    path = write_video(tmp_path / "rot.mp4", [picture] * 4, codec="libx264", fps=10, rotation_ccw_deg=rotation_ccw_deg)
    clip = decode_clip(str(path), 0.0, 0.4, num_frames=2)
    expected = np.rot90(picture, k=rotation_ccw_deg // 90)
    assert clip.frames.shape[1:] == expected.shape and mean_abs_diff(clip.frames[0], expected) < 3.0, clip.decoder


def test_frames_are_shrunk_to_max_pixels_keeping_the_aspect(samples):
    clip = decode_clip(str(samples / "nasa_13013.mp4"), 0.0, 1.0, num_frames=2, max_pixels=100 * 100)
    _, height, width, _ = clip.frames.shape
    assert height * width <= 100 * 100
    assert width / height == pytest.approx(480 / 270, rel=0.02)
    small = decode_clip(str(samples / "h265_video.mp4"), 0.0, 1.0, num_frames=2)  # 128x128: never upscaled
    assert small.frames.shape[1:3] == (128, 128)


def test_fit_to_max_pixels():
    assert frame_sampling.fit_to_max_pixels(720, 1280, 448 * 448) == (336, 597)
    assert frame_sampling.fit_to_max_pixels(270, 480, 448 * 448) == (270, 480)
    assert frame_sampling.fit_to_max_pixels(10_000, 1, 100) == (100, 1)
    for h, w, limit in [(1080, 1920, 200_704), (568, 320, 1000), (7, 3, 1)]:
        fit_h, fit_w = frame_sampling.fit_to_max_pixels(h, w, limit)
        assert fit_h * fit_w <= limit and fit_h >= 1 and fit_w >= 1


def test_shrink_is_pils_antialiased_bilinear_within_one_level(samples):
    """frame_sampling.shrink (torch's uint8 kernel, what the decoder process resizes with) gives
    PIL's BILINEAR resize, the pipeline's resize before it, within one level on a real frame; and it
    filters: a one-pixel checkerboard becomes even grey, where sampling without antialiasing would
    keep black and white pixels. Channels keep their order."""
    from PIL import Image

    [frame] = decode_clip(str(samples / "nasa_13013.mp4"), 4.0, 5.0, num_frames=1, max_pixels=10**9).frames
    height, width = frame_sampling.fit_to_max_pixels(*frame.shape[:2], 100 * 100)
    ours = frame_sampling.shrink(frame, height, width)
    pil = np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR))
    assert ours.shape == (height, width, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous
    assert np.abs(ours.astype(int) - pil).max() <= 1 and np.abs(ours.astype(int) - frame.mean((0, 1))).mean() > 5

    board = (np.indices((270, 480)).sum(0) % 2 * 255).astype(np.uint8)
    colored = np.stack([board, 255 - board, np.full_like(board, 40)], axis=-1)
    small = frame_sampling.shrink(colored, 126, 224).astype(int)
    assert np.abs(small[..., :2] - 127.5).max() <= 20 and (small[..., 2] == 40).all()


def test_sample_times_and_their_argument_checks():
    assert frame_sampling.sample_times_s(0.0, 10.0, num_frames=4, fps=None) == [1.25, 3.75, 6.25, 8.75]
    assert frame_sampling.sample_times_s(0.0, 2.0, num_frames=None, fps=2.0) == [0.25, 0.75, 1.25, 1.75]
    with pytest.raises(ValueError, match="start_s"):
        frame_sampling.sample_times_s(5.0, 5.0, num_frames=4, fps=None)
    with pytest.raises(ValueError, match="num_frames"):
        frame_sampling.sample_times_s(0.0, 1.0, num_frames=0, fps=None)
    with pytest.raises(ValueError, match="fps"):
        frame_sampling.sample_times_s(0.0, 1.0, num_frames=4, fps=-1.0)


def test_records_round_trip_through_arrow(samples):
    import pyarrow as pa

    clip = decode_clip(str(samples / "h265_video.mp4"), 0.0, 1.0, num_frames=3)
    table = pa.Table.from_pylist([video.frames_to_record(clip)])
    back = video.frames_from_record(table.to_pylist()[0])
    assert np.array_equal(back.frames, clip.frames)
    assert back.timestamps_s == clip.timestamps_s and back.decoder == clip.decoder and back.partial is False


# ------------------------------------------------------------------ damaged and unreadable files

def test_corrupted_sample_returns_the_frames_before_the_damage(samples):
    path = str(samples / "corrupted.mp4")
    clip = decode_clip(path, 0.0, 5.0, num_frames=16)
    # PyAV decodes frames 0..27 (0.0..2.7 s), then raises; decord would give up on the first bad packet
    assert clip.decoder == "pyav" and clip.partial
    assert "Invalid data" in clip.error
    assert clip.frames.shape == (9, 336, 597, 3)  # 1280x720 shrunk to <= 448*448 pixels
    assert clip.timestamps_s == pytest.approx([0.2, 0.5, 0.8, 1.1, 1.4, 1.7, 2.0, 2.3, 2.7])


def test_corrupted_sample_span_after_the_damage_is_an_error_naming_the_file(samples):
    path = str(samples / "corrupted.mp4")
    with pytest.raises(VideoError, match="corrupted.mp4") as caught:
        decode_clip(path, 3.0, 5.0)
    assert caught.value.uri == path
    assert "pyav:" in caught.value.reason and "decord:" in caught.value.reason  # auto fell back to decord
    with pytest.raises(VideoError, match="corrupted.mp4"):
        decode_clip(path, 0.0, 5.0, decoder="decord")  # decord alone salvages nothing


def make_broken(tmp_path: Path, samples: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.mp4"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "truncated":  # nasa keeps its index (moov) at the end: half the bytes lose it
        data = (samples / "nasa_13013.mp4").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(50_000))
    elif kind == "text":
        path.write_text("this is not a video\n" * 100)
    return path  # kind == "missing": never written


@pytest.mark.parametrize("kind", ["zero_bytes", "truncated", "random_bytes", "text", "missing"])
def test_unreadable_files_raise_video_error_naming_the_path(tmp_path, samples, kind):
    path = str(make_broken(tmp_path, samples, kind))
    with pytest.raises(VideoError) as by_probe:
        probe(path)
    with pytest.raises(VideoError) as by_decode:
        decode_clip(path, 0.0, 5.0)
    for caught in (by_probe, by_decode):
        assert path in str(caught.value) and caught.value.uri == path
    expected = {"zero_bytes": "empty", "missing": "no such file"}.get(kind, "Invalid data")
    assert expected in by_probe.value.reason


def test_a_matroska_file_cut_in_half_gives_a_partial_clip_not_padding(tmp_path, samples):
    data = (samples / "flipping_a_pancake.mkv").read_bytes()
    path = tmp_path / "cut.mkv"
    path.write_bytes(data[: len(data) // 2])  # MKV streams: the first ~5 s stay readable
    for decoder in decoders.DECODERS:
        clip = decode_clip(str(path), 0.0, 10.0, num_frames=16, decoder=decoder)
        assert clip.partial and "cut short" in clip.error, decoder
        assert 0 < len(clip.timestamps_s) < 16 and max(clip.timestamps_s) < 5.5


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_av1_decodes_with_decord2_and_pyav_alike(tmp_path, container):
    """decord 0.6.0 had no AV1 decoder (PyAV was the only way); decord2 (FFmpeg 8) reads it."""
    frames = [np.full((64, 64, 3), 20 * i, np.uint8) for i in range(10)]
    path = str(write_video(tmp_path / f"tiny_av1.{container}", frames, codec="libsvtav1", fps=10))
    by_decord = decode_clip(path, 0.0, 1.0, num_frames=5, decoder="decord")
    by_pyav = decode_clip(path, 0.0, 1.0, num_frames=5, decoder="pyav")
    assert decode_clip(path, 0.0, 1.0, num_frames=5).decoder == "pyav"  # auto: no fallback needed
    assert by_decord.frames.shape == by_pyav.frames.shape == (5, 64, 64, 3) and not by_decord.partial
    assert by_decord.timestamps_s == pytest.approx(by_pyav.timestamps_s, abs=1e-3)
    assert mean_abs_diff(by_decord.frames, by_pyav.frames) < 1.0
    assert probe(path).codec == "av1"


def _sample_names() -> list[str]:
    """Every sample video in ../shared/videos (a new sample is checked without editing this file)."""
    return sorted(p.name for p in SAMPLES.glob("*") if p.suffix.lower() in (".mp4", ".mkv", ".mov", ".webm", ".avi"))


@pytest.mark.parametrize("name", _sample_names())
def test_decord_provider_reads_every_sample_as_pyav_does(samples, name):
    """decord2 as the decord provider: on every sample, its probe and its first second of frames agree
    with PyAV's (corrupted.mp4's damage starts after 2.7 s)."""
    path = str(samples / name)
    by_decord, by_pyav = decoders.probe_decord(path), probe(path)
    assert (by_decord.num_frames, by_decord.width, by_decord.height) == (by_pyav.num_frames, by_pyav.width, by_pyav.height)
    assert by_decord.fps == pytest.approx(by_pyav.fps, abs=0.01)
    clips = [decode_clip(path, 0.0, 1.0, num_frames=4, decoder=decoder) for decoder in ("decord", "pyav")]
    assert clips[0].timestamps_s == pytest.approx(clips[1].timestamps_s, abs=1e-3)
    assert clips[0].frames.shape == clips[1].frames.shape and not clips[0].partial
    assert mean_abs_diff(clips[0].frames, clips[1].frames) < 2.0


def test_the_decord_module_is_decord2():
    """`import decord` must come from the decord2 distribution (pyproject, the lock), not decord 0.6.0."""
    from importlib.metadata import packages_distributions

    assert packages_distributions()["decord"] == ["decord2"]


# ------------------------------------------------------------------ long video, clip by clip

def test_one_clip_in_the_middle_of_a_ten_minute_video(tmp_path):
    # frame i shows its own index: red = (i // 30) * 6, green = (i % 30) * 8
    def picture(i: int) -> np.ndarray:
        return np.broadcast_to(np.array([(i // 30) * 6, (i % 30) * 8, 0], np.uint8), (64, 64, 3)).copy()

    path = str(write_video(tmp_path / "long.mp4", [picture(i) for i in range(1200)], codec="libx264", fps=2))
    info = probe(path)
    assert info.duration_s == pytest.approx(600.0) and info.num_frames == 1200
    clips = plan_clips(path, info.duration_s, clip_len_s=10.0, stride_s=10.0, min_clip_len_s=2.0)
    assert len(clips) == 60
    middle = clips[30]  # [300, 310): frames 600..619
    for decoder in decoders.DECODERS:
        clip = decode_clip(path, middle.start_s, middle.end_s, num_frames=None, fps=2.0, decoder=decoder)
        assert len(clip.timestamps_s) == 20 and all(300.0 <= t < 310.0 for t in clip.timestamps_s), decoder
        pixels = clip.frames[:, 32, 32].astype(float)
        shown = np.round(pixels[:, 0] / 6) * 30 + np.round(pixels[:, 1] / 8)
        assert shown.tolist() == [round(t * 2) for t in clip.timestamps_s] == list(range(600, 620)), decoder


# ------------------------------------------------------------------ the helper process

def test_a_hung_request_is_killed_and_the_helper_replaced():
    helper = DecoderProcess()
    try:
        helper.call(os.getpid, (), uri="warm-up", timeout_s=30)
        hung_pid = helper.pid
        started = time.monotonic()
        with pytest.raises(DecodeTimeout, match="timed out after 0.5 s") as caught:
            helper.call(time.sleep, (60,), uri="/videos/hangs.mp4", timeout_s=0.5)  # stands in for decord's loop
        assert time.monotonic() - started < 5
        assert caught.value.uri == "/videos/hangs.mp4"
        assert helper.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(hung_pid, 0)  # killed and reaped
        assert helper.call(os.getpid, (), uri="next", timeout_s=30) not in (hung_pid, os.getpid())
    finally:
        helper.close()


def test_decode_clip_timeout_is_a_video_error_and_the_next_call_works(samples):
    helper = DecoderProcess()
    path = str(samples / "nasa_13013.mp4")
    try:
        with pytest.raises(VideoError, match="timed out after 0.05 s"):
            decode_clip(path, 0.0, 13.0, num_frames=None, fps=30.0, timeout_s=0.05, process=helper)
        assert decode_clip(path, 0.0, 1.0, num_frames=2, process=helper).frames.shape[0] == 2
    finally:
        helper.close()


def test_a_crashing_helper_becomes_a_video_error_and_is_restarted():
    helper = DecoderProcess()
    try:
        with pytest.raises(VideoError, match="died \\(exit code 3\\)"):
            helper.call(os._exit, (3,), uri="/videos/segfaults.mp4", timeout_s=30)
        assert helper.call(abs, (-2,), uri="next", timeout_s=30) == 2
    finally:
        helper.close()


def test_errors_raised_in_the_helper_keep_their_uri_and_reason():
    helper = DecoderProcess()
    try:
        with pytest.raises(VideoError, match="/videos/x.mp4: ZeroDivisionError"):
            helper.call(Fraction, (1, 0), uri="/videos/x.mp4", timeout_s=30)
    finally:
        helper.close()
