"""The test command also lints: ruff on every file, mypy on the engine (pyproject.toml holds both
configurations). A finding fails the suite with the tool's own report."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    result = run_tool("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_types_the_engine():
    result = run_tool("mypy", "--cache-dir", "/dev/null")  # files and options: pyproject.toml [tool.mypy]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "no issues found" in result.stdout and "source files" in result.stdout


def test_lint_catches_a_planted_bug(tmp_path):
    """The configuration is live: an undefined name and an unsorted import are reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\n\ndef f():\n    return undefined_name + os.sep + sys.prefix\n")
    result = run_tool("ruff", "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad))
    assert result.returncode == 1 and "F821" in result.stdout and "I001" in result.stdout
