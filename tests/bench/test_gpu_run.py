"""bench/gpu_run.sh, the next GPU session's one device command, at toy size on CPU: a session with
15 minutes of device time cannot afford to find a typo in it there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.bench.test_bench_model import AUTO_BUDGET_GIB, TOY

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_run_script_measures_every_engine_where_the_readme_says(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
           "WHEELS": str(tmp_path / "no-wheels"),  # none carried: the installed transformers
           "TORCHDYNAMO_DISABLE": "1",  # the compiled engine's plumbing without an inductor compile (tests/v2drop does one)
           "HF_HUB_OFFLINE": "1", "INPUTS_DEVICE": "cpu", "INPUTS_ARGS": "--sizes 56x56 --clips 2 --frames 4"}
    toy = [*TOY[:TOY.index("--batch-sizes")], "--device", "cpu", "--new-tokens", "3",
           "--memory-budget-gib", str(AUTO_BUDGET_GIB)]
    toy[toy.index("--num-layers") + 1] = "4"
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_run.sh"), *toy], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((out / "model-cpu.json").read_text())
    engines: dict[tuple, set] = {}
    for r in report["rows"]:
        engines.setdefault((r["batch"], r["batch_chosen_by"]), set()).add(r["engine"])
    assert engines.pop((16, "fixed")) == {"static", "static-unfused", "compiled"}
    assert engines.pop((1, "fixed")) == {"static"}
    assert engines and all(by == "engine" and found == {"static"} for (_, by), found in engines.items())
    assert [r["batch"] for r in report["rows"]][0] == 16  # first, so a run cut short keeps the decode target's rows
    assert all(t["target"].endswith("[static]") for t in report["targets"])
    log = (out / "gpu_run.log").read_text()
    assert log.startswith("torch ") and f"wrote {out / 'model-cpu.json'}" in log
    inputs = json.loads((out / "inputs-cpu.json").read_text())  # the device run writes inputs-cuda.json
    assert [(r["family"], r["size"], r["clips"]) for r in inputs["rows"]] == [("qwen2_5_vl", "56x56", 2)]
    assert inputs["rows"][0]["device_ms"] > 0 and inputs["rows"][0]["levels"] == 0
