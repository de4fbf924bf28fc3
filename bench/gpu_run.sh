#!/usr/bin/env bash
# The next GPU session's one device command (the device tool's `run`, carry [".whl"]):
#   bash bench/gpu_run.sh
# Installs the wheels carried in .whl/ (git-ignored: the tested transformers series; the GPU image
# has transformers 5.17, which v2drop refuses) into /tmp/site, prints the versions, then runs into
# $OUT (the device tool's folder that comes back; else bench/results), with its log beside them:
#   1. bench_model's command for every figure issue 9 still lacks (README, "The next GPU run"),
#      writing a partial report after each batch size;
#   2. bench_inputs: a call's inputs built on the CPU vs on the GPU, cut at INPUTS_TIMEOUT_S (90 s):
#      second, as the 600 s limit of one device command would cut it first.
# Arguments replace bench_model's model and device ones (default: --seven-b --device cuda --dtype
# bfloat16) and come last, so they may override the rest too; INPUTS_DEVICE and INPUTS_ARGS do the
# same for bench_inputs. The suite runs this at toy size on CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
wheels="${WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
mkdir -p "$out"
model=(--seven-b --device cuda --dtype bfloat16)
if [ $# -gt 0 ]; then model=("$@"); fi
{
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
  python3 -m bench.bench_model --new-tokens 256 --batch-sizes 16 1 auto \
    --engines static static-unfused@16 compiled@16 --out-dir "$out" "${model[@]}" || echo "bench_model failed"
  timeout "${INPUTS_TIMEOUT_S:-90}" python3 -m bench.bench_inputs --device "${INPUTS_DEVICE:-cuda}" --families qwen2_5_vl \
    --clips 1 16 64 --threads 1 --repeats 1 --out-dir "$out" ${INPUTS_ARGS:-} || echo "bench_inputs failed or ran out of time"
} 2>&1 | tee "$out/gpu_run.log"
