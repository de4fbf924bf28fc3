#!/usr/bin/env bash
# Run the suite at the two ends of the version range pyproject.toml declares, which the lock
# (requirements.lock: what CI installs and tests) does not cover:
#   bash scripts/range.sh lowest   # each direct dependency at the lowest release it allows
#   bash scripts/range.sh newest   # every dependency at its newest release, torch and torchvision too
# Each builds a fresh venv in a temp dir from a resolution by uv (`uv pip compile`; lowest-direct
# is uv's own mode, which pip lacks), installs the project into it and runs the test command's
# pytest line with it. The oldest transformers beside it comes from .venv (scripts/setup.sh).
# uv downloads torch's CUDA build from the package index: several GB per run. PYTHON_VERSION
# (default 3.11) picks the interpreter, which uv must find on the machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
  lowest) resolution=lowest-direct ;;
  newest) resolution=highest ;;
  *) echo "usage: bash scripts/range.sh lowest|newest" >&2; exit 2 ;;
esac
python=${PYTHON_VERSION:-3.11}
source scripts/setup.sh  # .venv/transformers-oldest, for the suite's version-range test
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # several GB, passed or not
python -m venv "$work/uv" && "$work/uv/bin/pip" install -q uv
uv="$work/uv/bin/uv"
"$uv" pip compile -q --no-header --resolution "$resolution" --python-version "$python" --extra dev pyproject.toml -o "$work/pins.txt"
"$uv" venv -q --seed -p "$python" "$work/venv"
"$uv" pip install -q -p "$work/venv" -r "$work/pins.txt"
"$uv" pip install -q -p "$work/venv" --no-deps -e .
"$work/venv/bin/python" -c "import torch, torchvision, transformers, numpy
print('range.sh $1: torch', torch.__version__, 'torchvision', torchvision.__version__,
      'transformers', transformers.__version__, 'numpy', numpy.__version__)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PATH="$work/venv/bin:$PATH"
"$work/venv/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "${@:2}"
