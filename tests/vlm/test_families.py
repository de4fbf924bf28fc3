"""vlm.families is the one home of family knowledge: torch-free, matched by the engine's adapters,
and the only source file (besides the adapters) that names a family."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlm import families
from vlm.families import FAMILIES, TINY_FAMILIES

ROOT = Path(__file__).resolve().parents[2]
# Where family names belong: the table, the tiny builder's templates, and one engine adapter per family.
FAMILY_HOMES = ("vlm/families.py", "vlm/templates.py", "v2drop/adapters/")
PACKAGES = ("v2drop", "vlm", "workers", "pipeline")


def test_the_table_and_the_source_rules_import_without_torch_or_transformers():
    """pipeline.preflight imports them before any cluster or model work (exit 2 in about a second)."""
    code = ("import sys, vlm.families, vlm.sources, pipeline.preflight; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_row_has_an_engine_adapter_and_every_adapter_a_row():
    from v2drop.adapters import ADAPTERS

    adapted = [t for adapter in ADAPTERS for t in adapter.model_types]
    assert sorted(adapted) == sorted(FAMILIES)


def test_tiny_builds_every_family_of_the_table():
    assert TINY_FAMILIES == ("qwen2_5_vl", "qwen3_vl", "llava_onevision", "qwen2_vl")


def test_unknown_model_type_is_refused_with_the_supported_ones():
    with pytest.raises(ValueError, match="unsupported model_type 'llama'; supported: qwen2_5_vl, qwen3_vl, llava_onevision, qwen2_vl"):
        families.family("llama")
    assert families.needs_equal_frame_count(type("Config", (), {"model_type": "llama"})()) is False


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_visual_token_ids_are_the_tiny_tokenizers_placeholders(model_type):
    from vlm import tiny

    tokenizer = tiny.build_tokenizer(model_type)
    config = tiny.build_config(model_type, tokenizer, num_layers=1)
    row = FAMILIES[model_type]
    assert families.visual_token_ids(config) == tuple(
        tokenizer.convert_tokens_to_ids(token) for token in (row.image_token, row.video_token))


def _family_mentions(path: Path, names: re.Pattern, root: Path = ROOT) -> list[str]:
    """Identifiers and string constants (not docstrings, not comments) that name a family."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
        elif isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Attribute):
            text = node.attr
        else:
            continue
        if names.search(text):
            found.append(f"{path.relative_to(root)}:{node.lineno}: {text[:60]!r}")
    return found


def test_no_source_file_outside_the_table_and_the_adapters_names_a_family():
    """Adding a family is one row in vlm/families.py and one adapter file: nothing else may branch on
    a family's model_type or name its transformers classes."""
    rows = FAMILIES.values()
    class_names = {name for row in rows for name in (row.config_class, row.model_class, row.processor_class,
                                                     row.image_processor_class, row.video_processor_class) if name}
    names = re.compile("|".join([rf"\b{re.escape(t)}\b" for t in FAMILIES] + [re.escape(c) for c in class_names]),
                       re.IGNORECASE)
    mentions = [
        mention
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if not str(path.relative_to(ROOT)).startswith(FAMILY_HOMES)
        for mention in _family_mentions(path, names)
    ]
    assert mentions == []


def test_the_scan_finds_a_family_branch(tmp_path):
    """The scan above would catch the kind of table it replaced."""
    bad = tmp_path / "captioner.py"
    bad.write_text('"""Says llava_onevision in a docstring: fine."""\nEQUAL = frozenset({"llava_onevision"})\n')
    assert _family_mentions(bad, re.compile(r"\bllava_onevision\b"), root=tmp_path) == ["captioner.py:2: 'llava_onevision'"]


def test_vlm_imports_nothing_of_the_engine_the_workers_or_the_pipeline():
    """The arrows point one way: v2drop, workers and pipeline import vlm, never the reverse."""
    imported = set()
    for path in sorted((ROOT / "vlm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    assert "vlm" in imported and not imported & {"v2drop", "workers", "pipeline", "ray"}
