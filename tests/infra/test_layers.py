"""The folder layout is the architecture: vlm/ (model support) imports none of the others, v2drop/
(the engine) imports neither workers/ nor pipeline/, and workers/ (models for Ray) does not
import pipeline/ (stages). Checked on the source,
so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"vlm": ("v2drop", "workers", "pipeline", "ray"), "v2drop": ("workers", "pipeline", "ray"),
             "workers": ("pipeline",)}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    offenders = {f"{path.relative_to(REPO)} imports {name}"
                 for path in (REPO / package).rglob("*.py")
                 for name in imported_packages(path) & set(FORBIDDEN[package])}
    assert not offenders, sorted(offenders)
