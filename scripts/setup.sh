#!/usr/bin/env bash
# Idempotent set-up of .venv, sourced by the README's two commands. Installs exactly the stack
# the suite passed on (requirements.lock, pip constraints), torch first: the CPU build where there
# is no GPU (an unconstrained torch would pull several GB of CUDA packages), the CUDA build of the
# same version where there is one. Then the oldest declared transformers, beside the locked one,
# for the suite's version-range tests (requirements-oldest.txt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$(cat pyproject.toml requirements.lock requirements-oldest.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pip install -q -c requirements.lock torch
  pip install -q -c requirements.lock -e '.[dev]'
  rm -rf .venv/transformers-oldest
  pip install -q --no-deps --target .venv/transformers-oldest -r requirements-oldest.txt
  rm -f .venv/.installed-*
  touch "$stamp"
fi
