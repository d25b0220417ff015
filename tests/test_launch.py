"""launch/slurm.sbatch run as Slurm would run it on two nodes, on this machine: a stand-in `srun` starts its
command once per node at once, a stand-in `scontrol` names this machine as the first node, and the two
torchruns meet by c10d rendezvous there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .mp import free_port, worker

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


# ------------------------------------------------------------------ python -m distload.launch

LAUNCH = [sys.executable, "-m", "distload.launch", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launcher_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("distload.launch:")]
    assert len(lines) == 1, text[-3000:]
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]
    return lines[0]


def test_launcher_keeps_a_usage_error_and_names_the_rank(tiny_ckpt):
    proc = subprocess.run([*LAUNCH, "-m", "distload.load", "--model", str(tiny_ckpt), "--device", "cpu",
                           "--max-memory", "0=20G"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _launcher_line(proc.stderr)
    assert line.startswith("distload.launch: rank 0 (local rank 0) failed, exit code 2: ")
    assert "memory size '20G' is ambiguous" in line


def test_launcher_exits_with_the_failing_ranks_own_code(tmp_path):
    script = tmp_path / "fails_on_rank_1.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n    sys.exit(7)\n"
                      "time.sleep(30)   # rank 0 still runs: the launcher stops it\n")
    proc = subprocess.run([*LAUNCH, str(script)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 7, proc.stderr[-3000:]
    assert _launcher_line(proc.stderr) == "distload.launch: rank 1 (local rank 1) failed, exit code 7: exited with 7"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_launcher_stopped_by_a_signal_exits_with_its_code(tiny_ckpt, signum):
    """Ctrl-C reaches the launcher and its ranks (one process group); a scheduler's SIGTERM
    reaches the launcher, which stops the ranks."""
    env = {**ENV, "DISTLOAD_TEST_SLOW_READ": "60"}
    proc = subprocess.Popen([*LAUNCH, worker("cli_slowed.py"), "--model", str(tiny_ckpt), "--device", "cpu",
                             "--max-new-tokens", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, process_group=0)
    try:
        seen = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "reading (slowed)" not in seen:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signum, seen + rest
    name = signal.Signals(signum).name
    assert _launcher_line(rest) == (f"distload.launch: stopped by {name}; the ranks were told to stop "
                                    f"(exit code {128 + signum})")
    assert "terminate called" not in rest


# ------------------------------------------------------------------ the command lines the templates build

RECORD = """#!/usr/bin/env bash
# a stand-in that records its command line and the environment it passes on, and runs nothing
{ printf '%s\\n' "$@"; echo ---; env; } > "$RECORD_DIR/$(basename "$0").$$"
"""


def _stubs(tmp_path, *tools: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        (bin_dir / tool).write_text(RECORD)
        (bin_dir / tool).chmod(0o755)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho node-a\necho node-b\n")
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir


def _recorded(tmp_path, tool: str) -> tuple[list[str], dict[str, str]]:
    (record,) = tmp_path.glob(f"{tool}.*")
    argv, _, env = record.read_text().partition("---\n")
    return argv.splitlines(), dict(line.split("=", 1) for line in env.splitlines() if "=" in line)


def _sbatch_env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SRUN_", "HF_", "DISTLOAD_", "MASTER_", "NPROC", "NODE_CACHE"))}
    env.update(PATH=f"{_stubs(tmp_path, 'srun')}{os.pathsep}{env['PATH']}", RECORD_DIR=str(tmp_path),
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="32", TMPDIR="/scratch")
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


@pytest.mark.parametrize("nodes, gpus, nproc", [("1", "4", "4"), ("2", "h100:8", "8"), ("2", None, "1"),
                                                ("1", "0", "1")])
def test_slurm_template_command_line(tmp_path, nodes, gpus, nproc):
    env = _sbatch_env(tmp_path, SLURM_NNODES=nodes, SLURM_GPUS_PER_NODE=gpus, USER=None)  # USER unset
    proc = subprocess.run(["bash", str(SBATCH), "--model", "org/name", "--dtype", "bfloat16"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv, passed = _recorded(tmp_path, "srun")
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    assert argv == ["--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=1",
                    "python", "-m", "distload.launch", f"--nnodes={nodes}", f"--nproc_per_node={nproc}",
                    "--rdzv_backend=c10d", "--rdzv_endpoint=node-a:24242", "--rdzv_id=4242",
                    "-m", "distload.load", "--report", "distload-4242.json", "--model", "org/name",
                    "--dtype", "bfloat16"]
    assert passed["SRUN_CPUS_PER_TASK"] == "32"
    assert passed["HF_HUB_CACHE"] == f"/scratch/distload-{user}/hf-hub"
    assert passed["DISTLOAD_CACHE"] == f"/scratch/distload-{user}/distload"


@pytest.mark.parametrize("hf, kept", [({"HF_HOME": "/home/u/hf"}, None), ({"HF_HUB_OFFLINE": "1"}, None),
                                      ({"HF_HUB_CACHE": "/shared/hub"}, "/shared/hub")])
def test_slurm_template_keeps_a_hub_cache_the_user_chose(tmp_path, hf, kept):
    env = _sbatch_env(tmp_path, SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2", **hf)
    proc = subprocess.run(["bash", str(SBATCH), "--model", "org/name"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    _, passed = _recorded(tmp_path, "srun")
    assert passed.get("HF_HUB_CACHE") == kept
    assert passed.get("HF_HOME") == hf.get("HF_HOME")


def test_slurm_template_ports_differ_between_jobs(tmp_path):
    ports = []
    for job in ("1001", "1002"):
        run_dir = tmp_path / job
        run_dir.mkdir()
        env = _sbatch_env(run_dir, SLURM_NNODES="1", SLURM_JOB_ID=job)
        assert subprocess.run(["bash", str(SBATCH), "--model", "demo"], env=env, timeout=30).returncode == 0
        argv, _ = _recorded(run_dir, "srun")
        ports.append(next(a for a in argv if a.startswith("--rdzv_endpoint=")))
    assert ports == ["--rdzv_endpoint=node-a:21001", "--rdzv_endpoint=node-a:21002"]


@pytest.mark.parametrize("args, launcher, distload", [
    (["--model", "x"], [], ["--model", "x"]),
    (["--master_port=29600", "--", "--model", "x"], ["--master_port=29600"], ["--model", "x"]),
    (["--rdzv_endpoint=h:1", "--nnodes=2", "--", "--model", "x"], ["--rdzv_endpoint=h:1", "--nnodes=2"],
     ["--model", "x"]),
])
def test_torchrun_template_splits_launcher_and_distload_arguments(tmp_path, args, launcher, distload):
    bin_dir = _stubs(tmp_path, "python")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD_DIR": str(tmp_path),
           "NPROC": "3", "PYTHON": "python"}
    proc = subprocess.run(["bash", str(SBATCH.parent / "torchrun.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv, _ = _recorded(tmp_path, "python")
    standalone = [] if launcher else ["--standalone"]
    assert argv == ["-m", "distload.launch", *standalone, "--nproc_per_node=3", *launcher,
                    "-m", "distload.load", *distload]
