"""The job-config sections the model actor consumes: model, actors, prompt, generation, quality.

They live here, below `pipeline/`, so that the workers take typed settings without importing
the pipeline (the arrow points one way: pipeline -> workers). `pipeline.config.JobConfig`
composes them with the pipeline's own sections; this file and pipeline/config.py are the only
homes of defaults, and nothing else reads a section with a fallback.

Each `__post_init__` checks ranges and enums and raises `ConfigError` naming the dotted key,
e.g. ``model.retention: must be in (0, 1] (1.0 = no dropping), got 1.5``. What depends on the
storage layer (which URI schemes `model.source` may use) is checked in pipeline/config.py.
Torch-free: the driver imports this without loading a model stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CACHE_DIR = "~/.cache/v2drop-batch"  # model.cache_dir when null: node-local weights and videos


class ConfigError(ValueError):
    """An invalid job configuration; the message names the dotted key and what is allowed."""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def require_choice(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    require(value in allowed, key, f"must be one of {' | '.join(allowed)}, got {value!r}")


@dataclass
class ModelConfig:
    source: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # hub id, local path, s3:// prefix, or tiny:<family>
    revision: str | None = None
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    attn_implementation: str = "flash_attention_2"  # flash_attention_2 | sdpa | eager
    retention: float = 0.25  # V²Drop layer-averaged visual-token retention; 1.0 = off
    # variation = V²Drop; random = a seeded random subset at the same schedule (the control baseline)
    scorer: str = "variation"
    cache_dir: str | None = None  # node-local cache; None = DEFAULT_CACHE_DIR

    def __post_init__(self) -> None:
        require(bool(self.source), "model.source", "must be a hub id, local path, s3:// prefix or tiny:<family>")
        require_choice(self.dtype, "model.dtype", ("bfloat16", "float16", "float32"))
        require_choice(self.attn_implementation, "model.attn_implementation", ("flash_attention_2", "sdpa", "eager"))
        require(0 < self.retention <= 1, "model.retention", f"must be in (0, 1] (1.0 = no dropping), got {self.retention}")
        require_choice(self.scorer, "model.scorer", ("variation", "random"))


@dataclass
class ActorsConfig:
    num_gpus: float = 1.0  # per actor; fractional allowed; 0 on CPU
    min_size: int = 1
    max_size: int = 8
    # Clips one actor call receives from Ray Data: the most one model call holds. Each model call
    # takes as many of them as fit the memory budget below (workers.call_size, v2drop.memory), so
    # V²Drop's smaller cache gives larger calls. 64 clips of 2,048 visual tokens: 5.9 GiB of frames.
    batch_size: int = 64
    memory_fraction: float = 0.9  # share of the GPU memory free after loading that one model call may use
    memory_budget_gib: float | None = None  # a fixed budget instead (any device); on CPU, none if unset

    def __post_init__(self) -> None:
        require(0 < self.memory_fraction <= 1, "actors.memory_fraction", f"must be in (0, 1], got {self.memory_fraction}")
        require(self.memory_budget_gib is None or self.memory_budget_gib > 0, "actors.memory_budget_gib",
                f"must be > 0 GiB or null, got {self.memory_budget_gib}")
        require(self.num_gpus >= 0, "actors.num_gpus", f"must be >= 0, got {self.num_gpus}")
        require(self.min_size >= 1, "actors.min_size", f"must be >= 1, got {self.min_size}")
        require(
            self.min_size <= self.max_size,
            "actors.max_size",
            f"must be >= actors.min_size={self.min_size}, got {self.max_size}",
        )
        require(self.batch_size >= 1, "actors.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class PromptConfig:
    task: str = "caption"  # caption | qa
    caption: str = "Describe this video in detail."
    questions: list[str] = field(default_factory=list)  # qa: several per clip; a manifest row may bring its own
    system: str | None = None

    def __post_init__(self) -> None:
        require_choice(self.task, "prompt.task", ("caption", "qa"))
        require(self.task != "caption" or bool(self.caption), "prompt.caption", "must not be empty for task caption")
        require(all(str(q).strip() for q in self.questions), "prompt.questions",
                f"must not hold a blank question (its rows would take the clip-level key, prompt ''): {self.questions}")


def default_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """`model.cache_dir`, or DEFAULT_CACHE_DIR when the YAML leaves it null."""
    return Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR)))


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling when temperature > 0; no top-k (the model's own is overridden)
    # Several prompts about one clip (qa) prefill its video once and continue per prompt from
    # that cache (workers.shared_prefix; workers.model_calls.plan_call decides per call and logs
    # a fallback); false gives each prompt its own copy of the video.
    share_video_prefix: bool = True
    # static: v2drop.static_decode (a preallocated cache per V²Drop stage, one static-shape step
    # captured as a CUDA graph on GPU; greedy only; 2-2.5x faster decode steps on an H200, see
    # bench/results/model-cuda-7b.md); dynamic: transformers' generate() on a DynamicCache;
    # auto: static when greedy (temperature 0), dynamic when sampling.
    decode_engine: str = "auto"

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, "generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require_choice(self.decode_engine, "generation.decode_engine", ("auto", "static", "dynamic"))
        require(self.decode_engine != "static" or self.temperature == 0, "generation.decode_engine",
                "static decodes greedily: it needs generation.temperature 0 (or use auto or dynamic)")
        require(self.temperature >= 0, "generation.temperature", f"must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {self.top_p}")

    def engine(self) -> str:
        """'static' or 'dynamic': decode_engine, with auto = static for greedy decoding (the static
        engine is greedy only) and dynamic for sampling."""
        if self.decode_engine == "auto":
            return "static" if self.temperature == 0 else "dynamic"
        return self.decode_engine


@dataclass
class QualityConfig:
    """The shadow quality guard (workers.shadow): a sample of clips also run with V²Drop off."""

    shadow_fraction: float = 0.02  # share of clips, chosen by a hash of clip_id; 0 = no shadow
    # Mean shadow agreement (word-level LCS ratio, dropped vs full-token output) below this gives
    # a warning. Greedy outputs that part ways keep diverging, so long captions score far below
    # short answers at the same quality: set it from a run at a retention you trust.
    min_agreement: float = 0.5
    enforce: bool = False  # true: below min_agreement the run exits non-zero, after writing everything

    def __post_init__(self) -> None:
        require(0 <= self.shadow_fraction <= 1, "quality.shadow_fraction",
                f"must be in [0, 1] (0 = no shadow), got {self.shadow_fraction}")
        require(0 <= self.min_agreement <= 1, "quality.min_agreement", f"must be in [0, 1], got {self.min_agreement}")
