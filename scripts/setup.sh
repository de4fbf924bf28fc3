#!/usr/bin/env bash
# Idempotent set-up of .venv, sourced by the README's two commands. Installs exactly the stack
# the suite passed on (requirements.lock, pip constraints), torch and torchvision first, at the
# lock's versions: whichever build of them the machine's package index offers (a CUDA build also
# runs on CPU; the lock pins the CUDA libraries it brings, and a CPU build simply needs none).
# Then the oldest declared transformers, beside the locked one, for the suite's version-range
# tests (requirements-oldest.txt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$(cat pyproject.toml requirements.lock requirements-oldest.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pip install -q -c requirements.lock torch torchvision
  pip install -q -c requirements.lock -e '.[dev]'
  if pip show -q decord 2>/dev/null; then  # a venv from before decord2: both own the `decord` package
    pip uninstall -q -y decord
    pip install -q -c requirements.lock --force-reinstall --no-deps decord2
  fi
  rm -rf .venv/transformers-oldest
  pip install -q --no-deps --target .venv/transformers-oldest -r requirements-oldest.txt
  rm -f .venv/.installed-*
  touch "$stamp"
fi
