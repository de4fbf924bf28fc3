"""The declared transformers range, refusal outside it, the run-time self-check, and the suite's
equivalence tests on the oldest declared version."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

import v2drop
import v2drop.api as api
from v2drop import compat, greedy, loop, runtime_check, static_decode
from vlm import testing as models

REPO = Path(__file__).resolve().parents[2]
OLDEST_DIR = REPO / ".venv" / "transformers-oldest"


def declared_transformers() -> Requirement:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return next(Requirement(d) for d in project["dependencies"] if d.startswith("transformers"))


def pinned(path: Path, name: str) -> Version:
    for line in path.read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return Version(line.split("==")[1])
    raise AssertionError(f"{path.name} pins no {name}")


def test_pyproject_declares_exactly_the_tested_series():
    spec = declared_transformers().specifier
    oldest, newest = (Version(s) for s in (compat.TESTED_TRANSFORMERS[0], compat.TESTED_TRANSFORMERS[-1]))
    for series in compat.TESTED_TRANSFORMERS:
        assert spec.contains(f"{series}.0") and spec.contains(f"{series}.9")
    assert not spec.contains(f"{oldest.major}.{oldest.minor - 1}.9")
    assert not spec.contains(f"{newest.major}.{newest.minor + 1}.0")


def test_the_lock_pins_the_newest_and_the_range_test_the_oldest():
    assert compat.installed_series(str(pinned(REPO / "requirements.lock", "transformers"))) == compat.TESTED_TRANSFORMERS[-1]
    assert compat.installed_series(str(pinned(REPO / "requirements-oldest.txt", "transformers"))) == compat.TESTED_TRANSFORMERS[0]
    assert declared_transformers().specifier.contains(pinned(REPO / "requirements-oldest.txt", "transformers"))


def test_enable_refuses_an_untested_transformers(monkeypatch):
    assert compat.check_transformers(version=transformers.__version__)  # the installed one is tested
    with pytest.raises(ValueError, match=r"tested with transformers 5\.23, 5\.24; installed 5\.25\.0"):
        compat.check_transformers(version="5.25.0")
    monkeypatch.setattr(api.compat, "installed_version", lambda: "5.25.0")  # what enable() reads
    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    model = models.model("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"tested with transformers 5\.23, 5\.24; installed 5\.25\.0") as error:
        v2drop.enable(model, v2drop.Schedule.for_retention(8, 0.25))
    assert "allow_untested=True" in str(error.value) and compat.ALLOW_UNTESTED_ENV in str(error.value)
    assert not v2drop.is_enabled(model)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_opting_in_runs_the_self_check_first(monkeypatch, how):
    monkeypatch.setattr(api.compat, "installed_version", lambda: "5.25.0")
    monkeypatch.delenv(compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(ValueError):  # without the opt-in, refused
        compat.check_transformers()
    ran = []
    real_run = runtime_check.run
    monkeypatch.setattr(runtime_check, "run", lambda *a: ran.append(a) or real_run(*a))
    runtime_check._cached.cache_clear()
    kwargs = {"allow_untested": True} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    model = models.model("llava_onevision")
    try:
        v2drop.enable(model, v2drop.Schedule.for_retention(8, 0.25), **kwargs)
    finally:
        runtime_check._cached.cache_clear()
    assert ran == [("llava_onevision",)]
    assert v2drop.is_enabled(model)


def test_the_self_check_catches_layers_called_with_the_wrong_cache(monkeypatch):
    """The 5.24 failure: layers wrote to another cache than the one decode continues from."""
    assert v2drop.self_check("qwen2_5_vl", cached=False).family == "qwen2_5_vl"
    monkeypatch.setattr(loop, "cache_kwarg", lambda cache: {compat.CACHE_ARG: None})
    with pytest.raises(v2drop.SelfCheckError, match=r"keep at 1\.0, vs the stock model: greedy tokens"):
        v2drop.self_check("qwen2_5_vl", cached=False)
    runtime_check._cached.cache_clear()  # a first enable() in a fresh process
    try:
        with pytest.raises(v2drop.SelfCheckError):
            v2drop.enable(models.model("qwen2_5_vl"), v2drop.Schedule.for_retention(8, 0.25))
    finally:
        runtime_check._cached.cache_clear()


def test_the_self_check_catches_a_wrong_drop(monkeypatch):
    """Keeping the LOWEST scores instead of the highest passes keep 1.0 but not the reference."""
    monkeypatch.setattr(api, "variation_scores", lambda now, prev: -(now.float() - prev.float()).norm(dim=-1))
    with pytest.raises(v2drop.SelfCheckError, match=r"with drops, sample 0 of a padded batch vs the slow reference"):
        v2drop.self_check("qwen3_vl", cached=False)


@pytest.mark.slow
def test_engine_equivalence_on_the_oldest_declared_transformers():
    """Each CI run proves the whole declared range: the locked (newest) transformers runs the
    suite itself; here the same equivalence tests run on the oldest, installed by setup.sh."""
    if not OLDEST_DIR.is_dir():
        pytest.fail(f"{OLDEST_DIR} is missing: scripts/setup.sh installs requirements-oldest.txt there")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OLDEST_DIR), str(REPO)])}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert version == str(pinned(REPO / "requirements-oldest.txt", "transformers"))
    tests = ["tests/v2drop/test_engine.py", "tests/v2drop/test_api.py", "tests/workers/test_shared_prefix.py",
             "tests/workers/test_device_inputs.py",
             "tests/v2drop/test_static_decode.py", "tests/v2drop/test_kernels.py", "tests/v2drop/test_decode_step.py",
             "tests/v2drop/test_fused_projections.py",
             "tests/v2drop/test_vision.py", "tests/v2drop/test_prefill_graphs.py",
             "tests/v2drop/test_compat.py::test_the_self_check_catches_layers_called_with_the_wrong_cache"]
    # Not the slow ones: torch.compile of the static step is a benchmark option, not the service's path.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"on transformers {version}:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    assert " passed" in run.stdout and " failed" not in run.stdout


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_the_self_check_catches_a_repetition_penalty_unlike_generates(monkeypatch, family):
    """The static step applies the model's repetition penalty itself; a release that changed how
    generate() applies it (here: our copy forgets the sign rule) must fail the check, though the
    tiny models' 3 greedy tokens may not move."""
    assert v2drop.self_check(family, cached=False).family == family
    monkeypatch.setattr(greedy, "penalize_repeats",
                        lambda logits, seen, token, penalty: torch.where(seen.scatter(1, token, True), logits.float() / penalty, logits.float()))
    with pytest.raises(v2drop.SelfCheckError, match=r"repetition penalty 1\.3, step 0 vs generate...s processor: logits differ"):
        v2drop.self_check(family, cached=False)


def test_the_self_check_catches_a_static_engine_off_by_one_position(monkeypatch):
    """The static decode engine (the model stage's default when greedy) continues the rotary
    positions itself; one position off passes the generate() checks but not this one."""
    real = static_decode.static_state

    def shifted(*args, **kwargs):
        state = real(*args, **kwargs)
        state.next_positions += 1
        return state

    monkeypatch.setattr(static_decode, "static_state", shifted)
    with pytest.raises(v2drop.SelfCheckError, match=r"static decode engine, every keep at 1\.0, fed generate...s tokens: logits differ"):
        v2drop.self_check("qwen2_5_vl", cached=False)
