"""`scripts/gpu_check.sh` on a machine without a GPU (``GPU_CHECK_CPU=1``): its plan step
plans both of its models (the multi-GB preset and the pipeline's small model) for every
world size from 1 to 8 from headers alone, within the step's own limit, and the steps'
limits add up to the whole check's (which its table holds the run to)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _budget(path: Path) -> tuple[int, dict[str, int], str]:
    limit, steps, fs = 0, {}, ""
    for line in path.read_text().splitlines():
        kind, *rest = line.split("\t")
        if kind == "limit":
            limit = int(rest[0])
        elif kind == "step":
            steps[rest[0]] = int(rest[1])
        elif kind == "work":
            fs = rest[1]
    return limit, steps, fs


def test_gpu_check_plans_its_models_for_one_to_eight_ranks_within_its_budget(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "GPU_CHECK_CPU": "1", "GPU_CHECK_STEPS": "plan", "GPU_CHECK_NO_INSTALL": "1",
           "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", str(SCRIPT), str(results)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the script and every process it started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    plan = json.loads((results / "plan.json").read_text())
    assert plan["pass"] and plan["max_ranks"] == 8 and set(plan["models"]) == {"4gb", "tiny"}
    for name, worlds in plan["models"].items():
        assert sorted(map(int, worlds)) == list(range(1, 9)), name
        for world, row in worlds.items():
            assert len(row["units"]) == int(world) and min(row["units"]) >= 1, (name, world, row)
    limit, limits, _ = _budget(results / "budget.tsv")
    ran = dict(line.split("\t")[::2] for line in (results / "steps.tsv").read_text().splitlines())
    assert set(ran) == {"plan"} and int(ran["plan"]) <= limits["plan"]
    # every step the script runs has a limit, and the limits add up to the whole check's
    named = set(re.findall(r"^step ([\w-]+)", SCRIPT.read_text(), flags=re.M))
    assert named == set(limits) and sum(limits.values()) == limit
    summary = (results / "summary.txt").read_text()
    assert re.search(r"^plan 4gb for 1\.\.8 cpu ranks +PASS", summary, flags=re.M), summary
