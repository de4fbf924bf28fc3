#!/usr/bin/env bash
# Move the lock forward: resolve the newest releases that pyproject.toml allows, pin them in
# requirements.lock, then run the whole suite against exactly that set.
#   bash scripts/lock.sh            # then commit requirements.lock if the suite passed
# torch and torchvision stay at TORCH_VERSION / TORCHVISION_VERSION (the lock's: moving them is a
# decision of its own, checked on a GPU too; infra/Dockerfile installs their CUDA build);
# the oldest declared transformers (requirements-oldest.txt) is tested beside the locked one by the suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
torch_version=${TORCH_VERSION:-$(sed -n 's/^torch==//p' requirements.lock)}
torchvision_version=${TORCHVISION_VERSION:-$(sed -n 's/^torchvision==//p' requirements.lock)}
venv=$(mktemp -d)/venv
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install -q "torch==$torch_version" "torchvision==$torchvision_version"
"$venv/bin/pip" install -q -e '.[dev]'
{
  echo "# The whole stack the suite passed on (pip constraints). Written by scripts/lock.sh; do not edit."
  echo "# Installed by scripts/setup.sh and infra/Dockerfile with: pip install -c requirements.lock ..."
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch(vision)?==[^+]+)\+.*/\1/'
} > requirements.lock.new
mv requirements.lock.new requirements.lock
rm -rf .venv/.installed-*  # setup.sh reinstalls from the new lock
bash scripts/test.sh
echo "requirements.lock moved forward and the suite passed: commit it." >&2
