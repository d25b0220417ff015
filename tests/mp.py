"""Run a script under torchrun (gloo on CPU) from a test, with a hard time limit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"


def torchrun(nproc: int, target: list[str], *, timeout: float = 120, env: dict | None = None,
             module: bool = False) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc [-m] target...`; output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += (["-m"] if module else []) + target
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TORCHELASTIC_ERROR_FILE": "", **(env or {})}
    full_env.pop("TORCHELASTIC_ERROR_FILE")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a rendezvous port for simulated nodes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_nodes(nprocs: list[int], target: list[str], envs: list[dict], *,
                   timeout: float = 240) -> list[tuple[int, str]]:
    """Simulated nodes on this machine, all launched at once: node k is `torchrun --nnodes=len(nprocs)
    --node_rank=k --master_addr=127.0.0.1 --nproc_per_node=nprocs[k] target...` in environment envs[k].
    Returns each node's (exit status, stdout and stderr); any launch still running at `timeout` is killed."""
    port, procs = free_port(), []
    for node, (nproc, env) in enumerate(zip(nprocs, envs)):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(nprocs)}", f"--node_rank={node}",
               "--master_addr=127.0.0.1", f"--master_port={port}", f"--nproc_per_node={nproc}", *target]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, log) for p, log in zip(procs, logs)]


def worker(name: str) -> str:
    return str(WORKERS / name)
