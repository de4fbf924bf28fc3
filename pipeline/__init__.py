"""Batch video captioning and QA on Ray Data: config, storage, video, clips, stages, `run()`.

    python -m pipeline jobs/caption.yaml preset=offline input.uri=/data/videos

Importing the package is cheap (model actors unpickle a `pipeline.storage.Storage`);
`run` and `load_job` are loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run", "load_job", "JobConfig", "ConfigError"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from pipeline.run import run

        return run
    if name in ("load_job", "JobConfig", "ConfigError"):
        from pipeline import config

        return getattr(config, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
