"""launch/slurm.sbatch run as Slurm would run it on two nodes, on this machine: a stand-in `srun` starts its
command once per node at once, a stand-in `scontrol` names this machine as the first node, and the two
torchruns meet by c10d rendezvous there."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .mp import free_port

pytestmark = pytest.mark.multiprocess

SBATCH = Path(__file__).resolve().parent.parent / "launch" / "slurm.sbatch"

SRUN = """#!/usr/bin/env bash
# srun's options dropped; the command once per node (SLURM_NNODES), all at once, as srun does
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" > "$FAKE_SLURM_LOG.$node" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def test_slurm_template_on_two_nodes(tiny_ckpt, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\necho 127.0.0.2\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HF_HUB_CACHE", "DISTLOAD_CACHE"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2",
               SLURM_JOB_ID="42", SLURM_GPUS_PER_NODE="h100:1", MASTER_PORT=str(free_port()),
               NODE_CACHE=str(tmp_path / "node-cache"), FAKE_SLURM_LOG=str(tmp_path / "log"), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SBATCH), "--model", str(tiny_ckpt), "--device", "cpu", "--max-new-tokens", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    logs = [(tmp_path / f"log.{n}").read_text() for n in (0, 1)]
    assert proc.returncode == 0, proc.stderr + "\n".join(log[-3000:] for log in logs)
    report = json.loads((tmp_path / "distload-42.json").read_text())
    # two nodes of one rank each (the GPU count taken from "h100:1"), one plan over both
    assert report["world_size"] == 2 and [r["rank"] for r in report["ranks"]] == [0, 1]
    assert sum(r["bytes_read"] for r in report["ranks"]) == report["checkpoint_bytes"]
    assert " host " in logs[0]
