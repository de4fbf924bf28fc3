#!/usr/bin/env bash
# The main job, end to end, on the embedded defaults:
#   sets up .venv, starts a local Ray cluster, submits jobs/caption.yaml with the offline
#   preset (a tiny random-weight Qwen2.5-VL built locally, CPU) over ../shared/videos through
#   `ray job submit`, shows where the output is and a few rows, and stops the cluster it started
#   (and only that one).
# Extra arguments are passed to the job as overrides, e.g. `bash scripts/demo.sh model.retention=0.5`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# A one-machine cluster: every Ray address stays on 127.0.0.1 (on Linux Ray would otherwise swap
# 127.0.0.1 for the machine's reachable address).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Ray 2.60 protects clusters with a token; make one for this machine if there is none yet.
export RAY_AUTH_MODE=token
[ -s "$HOME/.ray/auth_token" ] || ray get-auth-token --generate >/dev/null
root=$(pwd)
videos=${VIDEOS:-$(cd .. && pwd)/shared/videos}
out=${OUTPUT:-$root/outputs}
if [ ! -d "$videos" ]; then
  echo "sample videos not found at $videos: set VIDEOS=/path/to/videos" >&2
  exit 1
fi

# A cluster of our own, on loopback only, on free ports (a user's own Ray keeps its defaults).
# `ray start --block` stays in the foreground and stops exactly what it started when signalled:
# `ray stop` would end every Ray on the machine, a user's own cluster included.
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=${RAY_DASHBOARD_PORT:-$(free_port)}
ports=()
for name in port dashboard-agent-listen-port dashboard-agent-grpc-port runtime-env-agent-port \
            metrics-export-port ray-client-server-port; do
  ports+=("--$name=$(free_port)")
done
# No node drain when it is signalled: Ray waits up to 30 s for one, for Serve replicas it has none of.
RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 setsid ray start --head --block --num-cpus=2 --node-ip-address=127.0.0.1 "${ports[@]}" \
  --dashboard-host=127.0.0.1 --dashboard-port="$port" --disable-usage-stats >/dev/null 2>&1 &
head_pid=$!
trap 'kill -TERM "$head_pid" 2>/dev/null; wait "$head_pid" 2>/dev/null || true' EXIT
dashboard_up() {  # any HTTP answer (401 without the token included) means the head is up
  python - "$port" <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=2)
except urllib.error.HTTPError:
    pass
PY
}
for _ in $(seq 1 60); do
  dashboard_up && break
  kill -0 "$head_pid" 2>/dev/null || { echo "ray start failed" >&2; exit 1; }
  sleep 1
done

submit_log=$(mktemp)
for attempt in $(seq 1 30); do
  # The dashboard answers before its job agent is up; such a submission creates no job, so retry it.
  if ray job submit --address "http://127.0.0.1:$port" --working-dir . -- \
      python -m pipeline jobs/caption.yaml preset=offline "input.uri=$videos" "output.uri=$out" "$@" \
      2>&1 | tee "$submit_log"; then
    break
  fi
  grep -q "No available agent" "$submit_log" || exit 1
  sleep 2
done

python -m pipeline.show "$out" --job caption
