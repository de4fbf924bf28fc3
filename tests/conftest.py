"""Shared fixtures: one local Ray cluster per session, the shared sample videos, moto S3."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.__main__ import LOCAL_ONLY_RAY_ENV
from tests.s3_server import FAKE_AWS_ENV, s3_bucket, s3_server  # noqa: F401  (re-exported fixtures)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO_ROOT.parent / "shared" / "videos"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every Ray the tests start (in process, `ray start`, the CLI) uses 127.0.0.1 for all its addresses;
# set before anything imports ray, and inherited by the subprocesses.
os.environ.setdefault(LOCAL_ONLY_RAY_ENV, "0")


@pytest.fixture(scope="session")
def shared_videos() -> Path:
    """../shared/videos relative to the repo root; a clear failure when it is missing."""
    if not (SHARED_VIDEOS / "nasa_13013.mp4").is_file():
        pytest.fail(f"the shared sample videos are missing: expected {SHARED_VIDEOS} (see ../shared/videos/README.md)")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A real local Ray cluster with 2 CPUs, started once per test process (scripts/test.sh runs
    two, each with its own cluster) and stopped after.

    Workers get the repo on PYTHONPATH (so test modules' stage classes import there) and the
    fake AWS credentials of tests.s3_server (a worker does not see env set after it started).
    """
    import ray

    env = {"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", **FAKE_AWS_ENV}
    # address="local": a bare ray.init() joins whatever cluster /tmp/ray last recorded (a head an
    # earlier run left behind) and then refuses num_cpus.
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
