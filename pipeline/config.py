"""Job configuration: one dataclass per YAML section, defaults in exactly one place each.

The sections the model actor consumes (model, actors, prompt, generation, quality) are defined in
workers/settings.py and composed here; the pipeline's own sections are defined below.

Merge order (later wins)::

    OmegaConf.structured(JobConfig)  <-  job file  <-  jobs/presets/<preset>.yaml  <-  CLI k=v

then ``OmegaConf.to_object`` builds the dataclasses, whose ``__post_init__`` check ranges and
enums. Every error is a ``ConfigError`` whose message starts with the dotted key and says what
is allowed, e.g. ``model.retention: must be in (0, 1], got 1.5``; the checks the sections share and
the OmegaConf-error translation live in `pipeline.config_checks`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config_checks import (
    explain,
    load_yaml,
    parse_overrides,
    require_finite_numbers,
    require_supported_scheme,
)
from pipeline.redact import scrub_secrets

# The sections the model actor consumes are defined beside it (workers may not import pipeline);
# re-exported here, so the job config reads as one module to its users.
from workers.settings import (  # noqa: F401 - re-exported
    ActorsConfig,
    ConfigError,
    GenerationConfig,
    ModelConfig,
    PromptConfig,
    QualityConfig,
)
from workers.settings import require as _require
from workers.settings import require_choice as _require_choice

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class InputConfig:
    uri: str = "../shared/videos"  # folder, glob, s3://bucket/prefix, or manifest (.csv/.jsonl/.parquet)
    extensions: list[str] = field(default_factory=lambda: ["mp4", "mkv", "mov", "webm", "avi", "m4v"])
    limit: int | None = None  # at most this many videos (sorted by uri); None = all

    def __post_init__(self) -> None:
        _require(bool(self.uri), "input.uri", "must name a folder, glob, s3:// prefix or manifest")
        require_supported_scheme(self.uri, "input.uri")
        _require(self.limit is None or self.limit >= 1, "input.limit", f"must be >= 1 or null, got {self.limit}")

    @property
    def is_manifest(self) -> bool:
        return self.uri.lower().endswith(MANIFEST_SUFFIXES)


@dataclass
class OutputConfig:
    uri: str = "outputs"  # local folder or s3://bucket/prefix

    def __post_init__(self) -> None:
        _require(bool(self.uri), "output.uri", "must name a local folder or s3://bucket/prefix")
        require_supported_scheme(self.uri, "output.uri")


@dataclass
class StorageConfig:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO/moto
    region: str | None = None
    addressing_style: str = "auto"  # auto | path | virtual
    max_attempts: int = 8  # retries with backoff on throttling/transient errors
    connect_timeout_s: float = 10.0  # per connection attempt
    read_timeout_s: float = 60.0  # per socket read: a server that goes silent this long is retried
    object_timeout_s: float = 600.0  # one object (all attempts together) gives up after this: error row

    def __post_init__(self) -> None:
        # Not echoed: a value typed into the wrong storage key may be a secret.
        _require(self.addressing_style in ("auto", "path", "virtual"), "storage.addressing_style",
                 "must be one of auto | path | virtual (the value given is not shown)")
        _require(self.max_attempts >= 1, "storage.max_attempts", f"must be >= 1, got {self.max_attempts}")
        for name in ("connect_timeout_s", "read_timeout_s", "object_timeout_s"):
            _require(getattr(self, name) > 0, f"storage.{name}", f"must be > 0, got {getattr(self, name)}")


@dataclass
class ClipsConfig:
    clip_len_s: float = 10.0
    stride_s: float = 10.0  # < clip_len_s means overlap
    min_clip_len_s: float = 2.0  # a shorter tail is dropped; a shorter video is one clip of its whole length
    max_clips_per_video: int | None = None

    def __post_init__(self) -> None:
        _require(self.clip_len_s > 0, "clips.clip_len_s", f"must be > 0, got {self.clip_len_s}")
        _require(self.stride_s > 0, "clips.stride_s", f"must be > 0, got {self.stride_s}")
        _require(
            0 < self.min_clip_len_s <= self.clip_len_s,
            "clips.min_clip_len_s",
            f"must be in (0, clips.clip_len_s={self.clip_len_s}], got {self.min_clip_len_s}",
        )
        _require(
            self.max_clips_per_video is None or self.max_clips_per_video >= 1,
            "clips.max_clips_per_video",
            f"must be >= 1 or null, got {self.max_clips_per_video}",
        )


@dataclass
class DecodeConfig:
    num_frames: int = 16  # frames sampled evenly per clip (used when fps is null)
    fps: float | None = None  # sample at this rate instead
    max_pixels: int = 200704  # per-frame pixel bound (448*448) applied before the processor
    timeout_s: float = 120.0  # a decode that takes longer is killed and recorded as an error
    num_cpus: float = 1.0  # CPUs per decode task; its decoder runs this many threads (at least 1)
    # Why off: it changes which frames the model sees (README, "Decode"). decord, the fallback, decodes every frame.
    # PyAV decodes only frames others refer to (33-48 % less CPU with B-frames); a sample takes the nearest, a frame or 2 off
    reference_frames_only: bool = False

    def __post_init__(self) -> None:
        _require(self.num_frames >= 1, "decode.num_frames", f"must be >= 1, got {self.num_frames}")
        _require(self.fps is None or self.fps > 0, "decode.fps", f"must be > 0 or null, got {self.fps}")
        _require(self.max_pixels >= 28 * 28, "decode.max_pixels", f"must be >= 784, got {self.max_pixels}")
        _require(self.timeout_s > 0, "decode.timeout_s", f"must be > 0, got {self.timeout_s}")
        _require(self.num_cpus > 0, "decode.num_cpus", f"must be > 0, got {self.num_cpus}")


@dataclass
class RunConfig:
    resume: bool = True
    ray_address: str | None = None  # None: the cluster `ray job submit` runs in, else a new local Ray
    gpu_hourly_usd: float = 3.0  # for cost per video-hour in the summary
    # More error rows than this fraction of the job's keys: exit code 5 after writing everything.
    max_error_fraction: float = 0.5
    flush_interval_s: float = 30.0  # finished rows reach storage within this long (bounded loss on a crash)
    flush_rows: int = 2000  # ... or as soon as this many are buffered
    lease_ttl_s: float = 120.0  # one writer per (output, job): a lease not renewed this long is taken over
    lease_wait_s: float = 0.0  # a run finding the lease held waits this long for it, then exits 6
    log_level: str = "INFO"  # driver log: DEBUG | INFO | WARNING | ERROR (DEBUG also prints the resolved config)
    progress_every_s: float = 10.0  # one progress line (done, rate, ETA) at most this often
    ray_progress_bars: bool = False  # Ray Data's own per-operator bars (off: our progress line is the one display)
    report: bool = True  # write report.html (plots and tables) beside summary.json at the end
    # --dry-run's GPU-hour estimate when the output holds no earlier GPU run to learn it from; None: not estimated
    expected_video_hours_per_gpu_hour: float | None = None

    def __post_init__(self) -> None:
        _require_choice(self.log_level, "run.log_level", LOG_LEVELS)
        _require(self.progress_every_s > 0, "run.progress_every_s", f"must be > 0, got {self.progress_every_s}")
        _require(self.expected_video_hours_per_gpu_hour is None or self.expected_video_hours_per_gpu_hour > 0,
                 "run.expected_video_hours_per_gpu_hour", f"must be > 0, got {self.expected_video_hours_per_gpu_hour}")
        _require(self.gpu_hourly_usd >= 0, "run.gpu_hourly_usd", f"must be >= 0, got {self.gpu_hourly_usd}")
        _require(0 <= self.max_error_fraction <= 1, "run.max_error_fraction",
                 f"must be in [0, 1], got {self.max_error_fraction}")
        _require(self.flush_interval_s > 0, "run.flush_interval_s", f"must be > 0, got {self.flush_interval_s}")
        _require(self.flush_rows >= 1, "run.flush_rows", f"must be >= 1, got {self.flush_rows}")
        _require(self.lease_ttl_s >= 1, "run.lease_ttl_s", f"must be >= 1, got {self.lease_ttl_s}")
        _require(self.lease_wait_s >= 0, "run.lease_wait_s", f"must be >= 0, got {self.lease_wait_s}")


@dataclass
class JobConfig:
    job: str = "caption"  # job name; Hive partition `job=` of the output
    preset: str | None = None  # jobs/presets/<name>.yaml merged over the job file before CLI overrides
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    clips: ClipsConfig = field(default_factory=ClipsConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        require_finite_numbers(self)
        # Which schemes a model may come from is the storage layer's fact, so it is checked here.
        require_supported_scheme(self.model.source, "model.source", ("s3",))
        require_supported_scheme(self.model.cache_dir or "", "model.cache_dir", ("file",))
        # The job name becomes a Hive partition value and a path segment.
        _require(
            re.fullmatch(r"[A-Za-z0-9_.-]+", self.job or "") is not None,
            "job",
            f"must be letters, digits, '_', '-' or '.', got {self.job!r}",
        )
        # A manifest may bring per-video questions, so only a folder/glob/prefix input needs them here.
        _require(
            self.prompt.task != "qa" or bool(self.prompt.questions) or self.input.is_manifest,
            "prompt.questions",
            "task qa needs at least one question (set prompt.questions or give a manifest with a questions column)",
        )


# --- loading -------------------------------------------------------------------------------


def load_job(job_path: str | os.PathLike, overrides: list[str] = ()) -> JobConfig:
    """Build the validated JobConfig from a job file, its preset and CLI ``k=v`` overrides."""
    job_path = Path(job_path)
    job_file = load_yaml(job_path, "job file")
    cli = parse_overrides(overrides, JobConfig)
    preset = cli.get("preset", job_file.get("preset"))
    layers = [job_file]
    if preset:
        layers.append(load_yaml(preset_path(job_path, str(preset)), f"preset {preset!r}"))
    layers.append(cli)
    return resolve(layers)


def resolve(layers: list[Any]) -> JobConfig:
    """Merge dict/DictConfig layers over the structured defaults and build the dataclasses."""
    merged = OmegaConf.structured(JobConfig)
    try:
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(explain(e, JobConfig)) from None
    assert isinstance(cfg, JobConfig)
    return cfg


def preset_path(job_path: Path, preset: str) -> Path:
    """A preset name resolves to ``<job file's folder>/presets/<name>.yaml``; a path is used as is."""
    if preset.endswith((".yaml", ".yml")) or os.sep in preset:
        return Path(preset)
    return job_path.parent / "presets" / f"{preset}.yaml"


# --- paths and the resolved config ----------------------------------------------------------


def is_remote(uri: str) -> bool:
    return "://" in uri


def absolute_uri(uri: str, base_dir: str | None = None) -> str:
    """Local relative paths resolve against ``base_dir`` (the launch directory where known).

    Ray workers may run in another directory (under ``ray job submit --working-dir`` the
    driver runs in Ray's temporary copy of the repo), so every local path is made absolute in
    the driver before it reaches a task or actor.
    """
    if is_remote(uri):
        return uri
    base = base_dir or os.environ.get("V2DROP_LAUNCH_DIR") or os.getcwd()
    return os.path.normpath(os.path.join(base, os.path.expanduser(uri)))


def with_absolute_paths(cfg: JobConfig, base_dir: str | None = None) -> JobConfig:
    """Return ``cfg`` with input/output/cache paths absolute (see ``absolute_uri``)."""
    cfg.input.uri = absolute_uri(cfg.input.uri, base_dir)
    cfg.output.uri = absolute_uri(cfg.output.uri, base_dir)
    if cfg.model.cache_dir:
        cfg.model.cache_dir = absolute_uri(cfg.model.cache_dir, base_dir)
    return cfg


def check_local_input(cfg: JobConfig) -> None:
    """Fail fast, before any cluster work, when a local input (or a glob's folder) is absent."""
    uri = cfg.input.uri
    if is_remote(uri):
        return  # checked in preflight through Storage
    path = _glob_folder(uri)
    _require(
        os.path.exists(path),
        "input.uri",
        f"{path} does not exist; give an existing folder, glob, manifest or s3:// prefix "
        "(under `ray job submit --working-dir` use an absolute path or s3://)",
    )


def _glob_folder(uri: str) -> str:
    """'/data/*/a.mp4' -> '/data'; a path without wildcards is returned unchanged."""
    wildcard = re.search(r"[*?\[]", uri)
    return os.path.dirname(uri[: wildcard.start()]) or "." if wildcard else uri


def to_dict(cfg: JobConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML, secrets removed: what is printed and stored with a run."""
    return OmegaConf.to_yaml(OmegaConf.create(scrub_secrets(to_dict(cfg))))
