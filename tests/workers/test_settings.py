"""workers.settings: the model actor's typed config sections, read without fallbacks anywhere.

The sections are defined once (here, below the pipeline) and composed by pipeline.config.JobConfig;
these tests pin what resume depends on (the engine fingerprint's digits) and that no module
reads a section as a dict with a default of its own.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from workers import settings
from workers.provenance import engine_fingerprint
from workers.settings import ConfigError, GenerationConfig, ModelConfig, PromptConfig, QualityConfig

REPO = Path(__file__).resolve().parents[2]
SECTIONS = (settings.ModelConfig, settings.ActorsConfig, settings.PromptConfig, settings.GenerationConfig,
            settings.QualityConfig)
CONFIG_MODULES = (REPO / "pipeline" / "config.py", REPO / "workers" / "settings.py")


def test_engine_fingerprint_keeps_its_digits_for_the_same_settings() -> None:
    """Computed on main before the sections became dataclasses (they were dicts then): a resume
    compares these digits with the rows already written, so a refactor must not move them.
    A deliberate engine change bumps v2drop.ENGINE_VERSION, and these pins with it."""
    assert engine_fingerprint(ModelConfig(), GenerationConfig(), None) == "175352bf620e03e1"
    tiny = ModelConfig(source="tiny:qwen2_5_vl", retention=0.5)
    short = GenerationConfig(max_new_tokens=8)
    assert engine_fingerprint(tiny, short, "be brief") == "d188cd260a6e004a"
    assert engine_fingerprint(tiny, dataclasses.replace(short, temperature=0.7), "be brief") == "f2cbf16bbcb426a0"


def test_fingerprint_ignores_what_does_not_change_a_row() -> None:
    base = engine_fingerprint(ModelConfig(), GenerationConfig(), None)
    assert engine_fingerprint(ModelConfig(cache_dir="/nvme/cache"), GenerationConfig(share_video_prefix=False), None) == base
    assert engine_fingerprint(ModelConfig(scorer="random"), GenerationConfig(), None) != base


@pytest.mark.parametrize("build, expected", [
    (lambda: ModelConfig(retention=1.5), "model.retention: must be in (0, 1]"),
    (lambda: ModelConfig(dtype="int8"), "model.dtype: must be one of bfloat16 | float16 | float32, got 'int8'"),
    (lambda: GenerationConfig(top_p=0), "generation.top_p: must be in (0, 1], got 0"),
    (lambda: GenerationConfig(temperature=0.5, decode_engine="static"), "generation.decode_engine: static decodes greedily"),
    (lambda: PromptConfig(task="caption", caption=""), "prompt.caption: must not be empty for task caption"),
    (lambda: QualityConfig(shadow_fraction=2), "quality.shadow_fraction: must be in [0, 1]"),
    (lambda: settings.ActorsConfig(memory_fraction=0), "actors.memory_fraction: must be in (0, 1], got 0"),
])
def test_a_section_built_directly_names_the_dotted_key(build, expected) -> None:
    """Workers and tests build the sections without the YAML loader: the same checks apply."""
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value).startswith(expected)


def test_settings_import_neither_torch_nor_the_pipeline() -> None:
    """The driver and the config loader import these sections; they must not pull a model stack in."""
    code = "import sys, workers.settings; print(sorted(m for m in ('torch', 'transformers', 'pipeline') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def field_names() -> set[str]:
    return {f.name for section in SECTIONS for f in dataclasses.fields(section)}


def looks_like_config(receiver: ast.expr) -> bool:
    """`cfg`, `self.model_cfg`, `(quality_cfg or {})`: named like a config; a call's result (a
    parsed JSON document, say) is judged by its own `.get` keys instead."""
    if isinstance(receiver, ast.Call):
        return False
    names = [n.id for n in ast.walk(receiver) if isinstance(n, ast.Name)]
    names += [n.attr for n in ast.walk(receiver) if isinstance(n, ast.Attribute)]
    return any(word in name.lower() for name in names for word in ("cfg", "config", "settings"))


def config_fallbacks(source: str, names: set[str]) -> list[str]:
    """`.get(...)` calls that read a config value with a fallback: a `.get` on anything named like a
    config (`cfg`, `model_cfg`, `settings`, ...), or `.get("<a settings field>", default)`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"):
            continue
        key = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
        if looks_like_config(node.func.value) or (key in names and len(node.args) > 1):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_finder_catches_the_old_fallbacks() -> None:
    """The patterns removed from workers/ (model_cfg.get('dtype', 'float32') and friends) are found."""
    old = ("model_cfg.get('dtype', 'float32')\n(quality_cfg or {}).get('shadow_fraction')\n"
           "row.get('status')\nparams.get('max_new_tokens', 512)\n")
    assert [line.split(":")[0] for line in config_fallbacks(old, field_names())] == ["line 1", "line 2", "line 4"]


def test_no_module_outside_the_config_modules_reads_a_section_with_a_fallback() -> None:
    """One home per default: the dataclasses. A `.get(key, default)` elsewhere is a second one
    (the workers' float32/sdpa/1.0 once disagreed with the config's bfloat16/flash_attention_2/0.25)."""
    names = field_names()
    offenders = {f"{path.relative_to(REPO)} {hit}"
                 for folder in ("workers", "pipeline") for path in sorted((REPO / folder).rglob("*.py"))
                 if path not in CONFIG_MODULES for hit in config_fallbacks(path.read_text(), names)}
    assert not offenders, sorted(offenders)
