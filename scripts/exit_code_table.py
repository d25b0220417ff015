"""Measure the exit code table: cause → plain torchrun → python -m distload.launch → one
process (python -m distload.load), on the tiny test checkpoint, CPU ranks.

    PYTHONPATH=. python scripts/exit_code_table.py [CHECKPOINT]

Causes: a usage error (--max-memory 0=20G), an error (a missing --model), Ctrl-C (SIGINT
to the launcher's process group, as a terminal sends it) and a scheduler's SIGTERM (to the
launcher) while loading, and rank 1 killed (SIGKILL) while loading. Loads are slowed with
tests/workers/cli_slowed.py so that the signals land mid-load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOWED = str(ROOT / "tests" / "workers" / "cli_slowed.py")
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    "distload.launch": [sys.executable, "-m", "distload.launch", "--standalone", "--nproc_per_node=2"],
    "one process": [sys.executable],
}


def _run(launcher: str, args: list[str], *, signal_to=None, kill_rank1=False) -> int | str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT), "DISTLOAD_TEST_SLOW_READ": "60" if (signal_to or kill_rank1) else "0"}
    if launcher == "one process":
        if kill_rank1:
            return "-"
        env["RANK"] = "0"
    out = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([*LAUNCHERS[launcher], SLOWED, "--device", "cpu", *args], stdout=out,
                            stderr=subprocess.STDOUT, env=env, process_group=0, text=True)
    try:
        if signal_to or kill_rank1:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                out.seek(0)
                if out.read().count("reading (slowed)") >= (1 if launcher == "one process" else 2):
                    break
                time.sleep(0.1)
            if kill_rank1:
                pid = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
                pids = sorted(int(p) for p in pid)
                os.kill(pids[-1], signal.SIGKILL)      # the later-started worker: local rank 1
            elif signal_to[1] == "group":
                os.killpg(proc.pid, signal_to[0])
            else:
                proc.send_signal(signal_to[0])
        return proc.wait(180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    ckpt = sys.argv[1] if len(sys.argv) > 1 else None
    if ckpt is None:
        sys.path.insert(0, str(ROOT))
        from distload.sources.demo import make_checkpoint
        from tests.conftest import tiny_config

        ckpt = tempfile.mkdtemp() + "/tiny"
        make_checkpoint(tiny_config(torch_dtype="bfloat16"), ckpt, num_shards=3, dtype="bfloat16", seed=1)
    causes = {
        "usage error (--max-memory 0=20G)": dict(args=["--model", ckpt, "--max-memory", "0=20G"]),
        "error (missing --model)": dict(args=["--model", "/nonexistent/model"]),
        "Ctrl-C (SIGINT to the group) mid-load": dict(args=["--model", ckpt, "--max-new-tokens", "0"],
                                                      signal_to=(signal.SIGINT, "group")),
        "SIGTERM to the launcher mid-load": dict(args=["--model", ckpt, "--max-new-tokens", "0"],
                                                 signal_to=(signal.SIGTERM, "launcher")),
        "rank 1 killed (SIGKILL) mid-load": dict(args=["--model", ckpt, "--max-new-tokens", "0"], kill_rank1=True),
    }
    print("| cause | " + " | ".join(LAUNCHERS) + " |")
    print("|---|" + "---|" * len(LAUNCHERS))
    for cause, kw in causes.items():
        codes = [str(_run(launcher, kw["args"], signal_to=kw.get("signal_to"), kill_rank1=kw.get("kill_rank1", False)))
                 for launcher in LAUNCHERS]
        print(f"| {cause} | " + " | ".join(codes) + " |", flush=True)


if __name__ == "__main__":
    main()
