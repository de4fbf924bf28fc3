#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (slow tests included) in
# TEST_WORKERS processes (pytest-xdist; 0: in this one). A test file runs whole in one process
# (--dist loadfile), so a module's shared fixture (one pipeline run read by several tests) runs once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
