"""pipeline.config: defaults once, merge order, named errors, the stored resolved config."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

from pipeline._model import model_stage_kwargs
from pipeline.config import (
    ConfigError,
    JobConfig,
    absolute_uri,
    check_local_input,
    load_job,
    resolve,
    scrub_secrets,
    to_dict,
    to_yaml,
)
from workers import settings

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def error_of(*layers: dict) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(list(layers))
    return str(info.value)


def test_defaults_are_the_production_job() -> None:
    cfg = load_job(JOBS / "caption.yaml")
    assert cfg == resolve([])  # the caption job is the defaults: its file restates none of them
    assert (cfg.model.source, cfg.model.dtype, cfg.model.attn_implementation) == (
        "Qwen/Qwen2.5-VL-7B-Instruct", "bfloat16", "flash_attention_2")
    assert (cfg.model.retention, cfg.actors.num_gpus) == (0.25, 1.0)


def test_preset_then_cli_overrides_win() -> None:
    cfg = load_job(JOBS / "caption.yaml", ["preset=offline", "model.retention=0.5", "actors.batch_size=3"])
    assert (cfg.model.source, cfg.model.dtype, cfg.model.attn_implementation) == ("tiny:qwen2_5_vl", "float32", "sdpa")
    assert (cfg.actors.num_gpus, cfg.actors.max_size, cfg.decode.num_frames, cfg.clips.clip_len_s) == (0, 1, 4, 5.0)
    assert (cfg.model.retention, cfg.actors.batch_size) == (0.5, 3)


def test_qa_job_has_questions() -> None:
    cfg = load_job(JOBS / "qa.yaml", ["preset=offline"])
    assert cfg.prompt.task == "qa" and len(cfg.prompt.questions) == 3
    assert cfg.model.source == "tiny:qwen2_5_vl"


def test_job_files_start_with_the_shebang() -> None:
    for name in ("caption.yaml", "qa.yaml"):
        assert (JOBS / name).read_text().splitlines()[0] == "#!/usr/bin/env -S python -m pipeline"


@pytest.mark.parametrize(
    "layer, expected",
    [
        ({"model": {"retention": 0}}, "model.retention: must be in (0, 1]"),
        ({"model": {"retention": 1.5}}, "model.retention: must be in (0, 1]"),
        ({"model": {"dtype": "int8"}}, "model.dtype: must be one of bfloat16 | float16 | float32, got 'int8'"),
        ({"model": {"attn_implementation": "flash"}}, "model.attn_implementation: must be one of flash_attention_2 | sdpa | eager"),
        ({"actors": {"batch_size": 0}}, "actors.batch_size: must be >= 1, got 0"),
        ({"actors": {"min_size": 3, "max_size": 2}}, "actors.max_size: must be >= actors.min_size=3, got 2"),
        ({"prompt": {"task": "qa"}}, "prompt.questions: task qa needs at least one question"),
        ({"prompt": {"task": "qa", "questions": ["Who?", " "]}}, "prompt.questions: must not hold a blank question"),
        ({"prompt": {"task": "summarise"}}, "prompt.task: must be one of caption | qa"),
        ({"actors": {"batch_size": "eight"}}, "actors.batch_size: Value 'eight' of type 'str' could not be converted to Integer"),
        ({"model": {"retnetion": 0.5}}, "model.retnetion: unknown key; valid keys here are: source, revision, dtype, attn_implementation, retention, scorer, cache_dir"),
        ({"model": {"scorer": "entropy"}}, "model.scorer: must be one of variation | random, got 'entropy'"),
        ({"quality": {"shadow_fraction": 1.5}}, "quality.shadow_fraction: must be in [0, 1] (0 = no shadow), got 1.5"),
        ({"quality": {"min_agreement": -0.1}}, "quality.min_agreement: must be in [0, 1], got -0.1"),
        ({"modle": {}}, "modle: unknown key; valid keys here are: job, preset, input, output"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(layer: dict, expected: str) -> None:
    assert expected in error_of(layer)


def test_qa_questions_may_come_from_a_manifest() -> None:
    cfg = resolve([{"prompt": {"task": "qa"}, "input": {"uri": "/data/list.csv"}}])
    assert cfg.prompt.questions == [] and cfg.input.is_manifest


def test_cli_override_errors() -> None:
    with pytest.raises(ConfigError, match="model.retention: must be in"):
        load_job(JOBS / "caption.yaml", ["model.retention=1.5"])
    with pytest.raises(ConfigError, match="dotted key=value"):
        load_job(JOBS / "caption.yaml", ["model.retention"])
    with pytest.raises(ConfigError, match="preset: .*nope.yaml not found; available presets in .*: offline"):
        load_job(JOBS / "caption.yaml", ["preset=nope"])


def test_missing_local_input_is_found_before_any_cluster_work(tmp_path: Path) -> None:
    cfg = resolve([{"input": {"uri": str(tmp_path / "absent")}}])
    with pytest.raises(ConfigError, match=r"input.uri: .*absent does not exist"):
        check_local_input(cfg)
    check_local_input(resolve([{"input": {"uri": str(tmp_path / "*.mp4")}}]))  # a glob's folder exists
    check_local_input(resolve([{"input": {"uri": "s3://bucket/prefix"}}]))  # checked later, via Storage


def test_relative_paths_resolve_against_the_launch_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    assert absolute_uri("outputs", "/home/me/repo") == "/home/me/repo/outputs"
    assert absolute_uri("s3://b/outputs", "/home/me") == "s3://b/outputs"
    monkeypatch.setenv("V2DROP_LAUNCH_DIR", "/launch")
    assert absolute_uri("../videos") == "/videos"


def test_resolved_config_is_yaml_without_secrets() -> None:
    cfg = resolve([{"storage": {"endpoint_url": "http://user:hunter2@minio:9000"}}])
    stored = yaml.safe_load(to_yaml(cfg))
    assert stored["storage"]["endpoint_url"] == "http://***@minio:9000"
    assert stored["generation"]["max_new_tokens"] == 512  # 'tokens' is not a secret
    assert resolve([stored]) == resolve([{"storage": {"endpoint_url": "http://***@minio:9000"}}])
    scrubbed = scrub_secrets({"aws_secret_access_key": "x", "api_token": "t", "password": "p", "aws_access_key_id": "k"})
    assert set(scrubbed.values()) == {"***"}


def test_structured_defaults_are_the_only_defaults() -> None:
    assert resolve([]) == JobConfig()


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'model': {'dtype': 'float32'}} -> {'model.dtype': 'float32'}; lists are values."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("name", ["caption.yaml", "qa.yaml", "presets/offline.yaml"])
def test_job_files_state_only_what_differs_from_the_defaults_each_with_a_comment(name: str) -> None:
    """One home per default (pipeline/config.py, workers/settings.py): a job file or preset that
    restates one is a second copy that goes stale. `job` names the file's output partition."""
    text = (JOBS / name).read_text()
    defaults = leaves(to_dict(JobConfig()))
    stated = leaves(yaml.safe_load(text))
    restated = [key for key, value in stated.items() if key != "job" and defaults[key] == value]
    assert not restated, f"{name} restates defaults: {restated}"
    sections = {f.name for f in dataclasses.fields(JobConfig)}
    keys = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(("#", "-"))]
    bare = [line for line in keys if " #" not in line and line.rstrip(":") not in sections]
    assert not bare, f"{name}: keys without a comment saying why: {bare}"


def test_the_actor_gets_the_typed_sections_and_they_survive_pickling() -> None:
    """Ray pickles the constructor arguments; the worker receives dataclasses, never dicts."""
    cfg = load_job(JOBS / "qa.yaml", ["preset=offline", "quality.shadow_fraction=0.5", "actors.memory_budget_gib=2"])
    kwargs = pickle.loads(pickle.dumps(model_stage_kwargs(cfg)))
    assert {name: type(value) for name, value in kwargs.items() if name != "storage"} == {
        "model": settings.ModelConfig, "generation": settings.GenerationConfig, "prompt": settings.PromptConfig,
        "quality": settings.QualityConfig, "actors": settings.ActorsConfig}
    assert (kwargs["model"], kwargs["prompt"], kwargs["quality"], kwargs["actors"]) == (
        cfg.model, cfg.prompt, cfg.quality, cfg.actors)
    assert kwargs["actors"].memory_budget_gib == 2.0 and kwargs["prompt"].questions == cfg.prompt.questions


def test_the_model_sections_are_the_workers_own_classes() -> None:
    """One definition: pipeline.config composes workers.settings' classes rather than copying them."""
    types = {f.name: f.type for f in dataclasses.fields(JobConfig)}
    for section, cls in (("model", settings.ModelConfig), ("actors", settings.ActorsConfig),
                         ("prompt", settings.PromptConfig), ("generation", settings.GenerationConfig),
                         ("quality", settings.QualityConfig)):
        assert types[section] == cls.__name__ and isinstance(getattr(JobConfig(), section), cls)
