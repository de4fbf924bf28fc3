"""No source file over 300 lines unless its docstring says why (issue 11: a module of one concern
reads in one sitting; a file that needs a table of contents is split).

A longer file states its reason in the first lines of its module docstring, on a line starting
"Longer than 300 lines because", so the exception is visible where a reader starts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("pipeline", "workers", "v2drop", "vlm", "bench")
MAX_LINES = 300
REASON = "Longer than 300 lines because"
REASON_WITHIN_LINES = 5  # of the docstring: where a reader starts


def source_files() -> list[Path]:
    return sorted(p for folder in SOURCE_FOLDERS for p in (REPO / folder).rglob("*.py"))


def over_length_without_reason(path: Path, root: Path = REPO) -> str | None:
    """'<file under root>: <n> lines ...' when `path` is too long and its docstring gives no reason, else None."""
    text = path.read_text()
    lines = len(text.splitlines())
    if lines <= MAX_LINES:
        return None
    head = (ast.get_docstring(ast.parse(text)) or "").splitlines()[:REASON_WITHIN_LINES]
    if any(line.strip().startswith(REASON) for line in head):
        return None
    return (f"{path.relative_to(root)}: {lines} lines (> {MAX_LINES}); split it by concern, or state why in "
            f"the first {REASON_WITHIN_LINES} lines of its docstring with a line starting '{REASON}'")


def test_the_rule_catches_a_long_file_and_accepts_a_stated_reason(tmp_path: Path) -> None:
    body = "\n".join(f"x{i} = {i}" for i in range(MAX_LINES))
    plain = tmp_path / "plain.py"
    plain.write_text('"""A module."""\n' + body + "\n")
    reasoned = tmp_path / "reasoned.py"
    reasoned.write_text(f'"""A module.\n\n{REASON} one table is read as a whole.\n"""\n' + body + "\n")
    late = tmp_path / "late.py"  # a reason buried below the first lines does not count
    late.write_text('"""A module.\n' + "\nmore.\n" * REASON_WITHIN_LINES + f'{REASON} x.\n"""\n' + body + "\n")
    short = tmp_path / "short.py"
    short.write_text("x = 1\n" * MAX_LINES)
    assert over_length_without_reason(plain, tmp_path) == (
        f"plain.py: {MAX_LINES + 1} lines (> {MAX_LINES}); split it by concern, or state why in the first "
        f"{REASON_WITHIN_LINES} lines of its docstring with a line starting '{REASON}'")
    assert over_length_without_reason(reasoned, tmp_path) is None
    assert over_length_without_reason(late, tmp_path) is not None
    assert over_length_without_reason(short, tmp_path) is None


@pytest.mark.parametrize("folder", SOURCE_FOLDERS)
def test_no_source_file_is_over_300_lines_without_a_reason(folder: str) -> None:
    files = [p for p in source_files() if p.relative_to(REPO).parts[0] == folder]
    assert files, f"no .py files under {folder}/"
    problems = [p for p in map(over_length_without_reason, files) if p]
    assert not problems, "\n".join(problems)
