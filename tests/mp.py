"""Run a script under torchrun (gloo on CPU) from a test, with a hard time limit."""

from __future__ import annotations

import os
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


def worker(name: str) -> str:
    return str(WORKERS / name)
