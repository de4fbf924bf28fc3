#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
python -m pytest -q "$@"
