"""A run you can watch: --help from pipeline/config.py, --dry-run's plan, pipeline.show's exit
codes and storage options, the progress line's ETA, the log format. None of these starts Ray."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from pathlib import Path

import pytest

from pipeline import __main__ as cli
from pipeline import config
from pipeline.logs import setup_logging
from pipeline.progress import eta
from pipeline.show import main as show_main

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_every_key_with_its_default(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for section in dataclasses.fields(config.JobConfig):
        cls = getattr(config, section.type, None) if isinstance(section.type, str) else section.type
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            continue
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert f"  {section.name}.{f.name} = {default!r}" in text, f"{section.name}.{f.name}"
    assert "run.log_level = 'INFO'    # driver log: DEBUG | INFO | WARNING | ERROR" in text
    # the model actor's sections are defined in workers/settings.py: their comments are shown too
    assert "model.retention = 0.25    # V²Drop layer-averaged visual-token retention; 1.0 = off" in text
    assert "quality.shadow_fraction = 0.02    # share of clips, chosen by a hash of clip_id; 0 = no shadow" in text


def test_dry_run_prints_the_plan_and_writes_nothing(shared_videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = cli.main([str(REPO / "jobs" / "caption.yaml"), "--dry-run", "preset=offline", f"input.uri={shared_videos}",
                     f"output.uri={out}", "run.expected_video_hours_per_gpu_hour=2", "run.gpu_hourly_usd=4"])
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "videos           5 (0 unreadable: error rows)" in text
    assert re.search(r"clips +8 \(5 s, stride 5 s\), 8 model rows", text)  # nasa 3 + pancake 2 + 3 short videos
    video_h = sum(float(m) for m in re.findall(r" ([\d.]+) s \d+x\d+,", text))  # whole short videos count in full
    gpu_h = float(re.search(r"GPU-hours +([\d.]+) at 2 video-h per GPU-h \(run.expected", text).group(1))
    assert gpu_h == pytest.approx(video_h / 3600 / 2, abs=1e-4)
    assert f"${gpu_h * 4:.2f} at run.gpu_hourly_usd=4" in text


def test_dry_run_refuses_a_bad_key_like_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([str(REPO / "jobs" / "caption.yaml"), "--dry-run", f"input.uri={tmp_path}/none"]) == cli.EXIT_CONFIG
    assert "input.uri" in capsys.readouterr().err


def test_show_exits_non_zero_on_a_missing_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert show_main([str(tmp_path / "nothing")]) == 2
    assert "no output of job 'caption'" in capsys.readouterr().err
    assert show_main([str(tmp_path), "model.retention=0.5"]) == 2
    assert "only storage.* options" in capsys.readouterr().err
    assert show_main([str(tmp_path), "storage.addressing_style=sideways"]) == 2
    assert "storage.addressing_style" in capsys.readouterr().err


def test_show_reaches_a_custom_s3_endpoint(s3_server: str, s3_bucket: str, capsys: pytest.CaptureFixture) -> None:
    """The storage options reach the client: an empty bucket on the endpoint is 'no output', not
    a connection error to AWS."""
    assert show_main([f"s3://{s3_bucket}/out", f"storage.endpoint_url={s3_server}"]) == 2
    assert f"no output of job 'caption' at s3://{s3_bucket}/out" in capsys.readouterr().err


def test_eta() -> None:
    assert (eta(280, 2.86), eta(0, 1.0), eta(5, 0.0), eta(7200, 1.0)) == ("1 min 38 s", "done", "unknown", "2 h 0 min")


def test_log_lines_have_a_utc_timestamp_and_a_level() -> None:
    stream = io.StringIO()
    log = setup_logging("INFO", stream)
    log.info("[plan] 3 videos")
    log.debug("hidden at INFO")
    logging.getLogger("botocore").info("Found credentials ...")  # third-party noise stays out
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ INFO  pipeline: \[plan\] 3 videos\n", stream.getvalue())
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.WARNING
