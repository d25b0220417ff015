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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """The ranks of one job started as plain processes, without torchrun's supervision (as
    a launcher or Slurm's ``srun`` per rank starts them), in one new process group — the
    group a terminal's Ctrl-C reaches. `argvs[r]` is rank r's command after the
    interpreter; each rank's output goes to its own file.

    Example::

        job = Ranks([[worker("x.py"), "a"], [worker("x.py"), "b"]], tmp_path)
        codes = job.wait(60)
        job.stderr(1)
    """

    def __init__(self, argvs: list[list[str]], out_dir: Path, *, env: dict | None = None) -> None:
        port, world = free_port(), len(argvs)
        self.out_dir, self.procs = Path(out_dir), []
        for rank, argv in enumerate(argvs):
            rank_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                        "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), **(env or {})}
            out = open(self.out_dir / f"rank{rank}.out", "w")
            err = open(self.out_dir / f"rank{rank}.err", "w")
            self.procs.append(subprocess.Popen(
                [sys.executable, *argv], stdout=out, stderr=err, env=rank_env,
                process_group=self.procs[0].pid if self.procs else 0))
            out.close()
            err.close()

    @property
    def pgid(self) -> int:
        return self.procs[0].pid

    def signal_all(self, signum: int) -> None:
        """`signum` to the whole group, as a terminal's Ctrl-C sends SIGINT."""
        os.killpg(self.pgid, signum)

    def wait(self, timeout: float) -> list[int | None]:
        """Each rank's exit code; None for a rank still running after `timeout` seconds
        (then killed, so no test leaves a process behind)."""
        import time

        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        return codes

    def stderr(self, rank: int) -> str:
        return (self.out_dir / f"rank{rank}.err").read_text()

    def stdout(self, rank: int) -> str:
        return (self.out_dir / f"rank{rank}.out").read_text()

    def wait_for(self, rank: int, text: str, timeout: float) -> bool:
        """Whether rank `rank` wrote `text` to stderr within `timeout` seconds."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr(rank):
                return True
            if self.procs[rank].poll() is not None:
                return text in self.stderr(rank)
            time.sleep(0.05)
        return False
