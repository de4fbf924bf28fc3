"""What produced a row: the software versions, the engine configuration actually used, the
self-check outcome, and the engine fingerprint that resume compares.

    engine_fingerprint  sha256 of everything besides the clip itself that changes a row's output:
                        model.source, .revision, .dtype, .attn_implementation, .retention, .scorer, the
                        sampling settings (generation.max_new_tokens, .temperature, .top_p), the
                        system prompt and v2drop.ENGINE_VERSION; 16 hex digits. The driver computes
                        it from the config before planning and the actors stamp it on every row,
                        so a resume counts a key (clip_id, prompt) as done only when its row came
                        from the same configuration; other rows are redone and replaced. The
                        schedule is a function of the retention and the model's depth: covered.
                        (clip_id itself depends only on the video, the span and the frames the
                        model sees: pipeline._shard.settings_key.)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import v2drop
from workers.settings import GenerationConfig, ModelConfig

MODEL_KEYS = ("source", "revision", "dtype", "attn_implementation", "retention", "scorer")
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p")
GIT_COMMIT_ENV = "V2DROP_GIT_COMMIT"  # set by infra/Dockerfile, where the image has no .git
PROJECT = "v2drop-batch"
REPO_ROOT = Path(__file__).resolve().parents[1]


def engine_fingerprint(model_cfg: ModelConfig, generation_cfg: GenerationConfig, system: str | None) -> str:
    """Example: (ModelConfig(source='tiny:qwen2_5_vl', retention=0.25, ...), GenerationConfig(), None)
    -> '3f9c0d...' (16 hex digits); the same settings always give the same digits (resume compares
    them across versions of this code, so the identity below keeps its keys and their order)."""
    identity = {
        "model": {key: getattr(model_cfg, key) for key in MODEL_KEYS},
        "generation": {key: getattr(generation_cfg, key) for key in GENERATION_KEYS},
        # the resolved engine (static or dynamic): their bf16 kernels differ, so may their tokens
        "decode_engine": generation_cfg.engine(),
        "system": system,
        "engine_version": v2drop.ENGINE_VERSION,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def software_versions() -> dict[str, str | None]:
    """The versions of this process: the same columns in every row and in the run summary."""
    return {
        "project_version": _version(PROJECT),
        "git_commit": git_commit(),
        "torch_version": _imported_version("torch"),
        "transformers_version": _imported_version("transformers"),
        "ray_version": _version("ray"),
    }


def _imported_version(module: str) -> str | None:
    """The imported module's version (a PYTHONPATH override can differ from what pip installed);
    the installed one in a process that does not import it (the driver: no torch import there)."""
    return sys.modules[module].__version__ if module in sys.modules else _version(module)


def git_commit() -> str | None:
    """The commit of the running code: $V2DROP_GIT_COMMIT, else `git rev-parse HEAD` of this
    checkout (with '-dirty' for uncommitted changes), else None (a `ray job submit` working dir
    carries no .git)."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        head = _git("rev-parse", "HEAD")
        return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def engine_columns(model: Any, fingerprint: str, self_check: str, inputs_device: Any = None) -> dict[str, Any]:
    """The provenance columns of every row a loaded model writes (see pipeline.schema);
    `inputs_device`: where the video processor works (workers.device_inputs), None for the CPU."""
    schedule = v2drop.schedule_of(model)
    return {
        **software_versions(),
        "engine_fingerprint": fingerprint,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "drop_layers": list(schedule.layers) if schedule else [],
        "drop_keep": list(schedule.keep) if schedule else [],
        "self_check": self_check,
        "inputs_device": str(inputs_device or "cpu"),
    }
