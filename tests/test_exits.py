"""How the CLI ends on every rank: one clear line, a documented exit code, no traceback, no
C++ abort — for ranks started with different arguments, a rank killed mid-load, Ctrl-C
(SIGINT) and a scheduler's SIGTERM mid-load and mid-generation, and a failure after the
load. Ranks are plain processes here (as a launcher or ``srun`` per rank starts them);
one run goes through torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from distload.cli.exits import ERROR, INTERRUPTED, TERMINATED, USAGE
from distload.cli.table import write_report

from .mp import Ranks, worker

pytestmark = pytest.mark.multiprocess

REPEATS = int(os.environ.get("DISTLOAD_TEST_REPEATS", "2"))  # the 10x: DISTLOAD_TEST_REPEATS=10
CLI = [worker("cli_slowed.py"), "--device", "cpu"]


def _clean(text: str) -> None:
    assert "Traceback" not in text, text[-2000:]
    assert "terminate called" not in text, text[-2000:]


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def test_ranks_started_with_different_arguments_fail_naming_them(tiny_ckpt, tmp_path):
    argv = [*CLI, "--model", str(tiny_ckpt), "--max-new-tokens"]
    start = time.monotonic()
    job = Ranks([argv + ["4"], argv + ["8"]], tmp_path)
    assert job.wait(60) == [USAGE, USAGE]
    assert time.monotonic() - start < 60
    for rank in (0, 1):
        _clean(job.stderr(rank))
        assert _last_line(job.stderr(rank)) == (
            f"[rank {rank}] ERROR the ranks were started with different arguments: rank 1 has "
            "--max-new-tokens 8 but rank 0 has 4")


def test_a_different_model_on_one_rank_is_refused(tiny_ckpt, tiny_tied_ckpt, tmp_path):
    job = Ranks([[*CLI, "--model", str(tiny_ckpt)], [*CLI, "--model", str(tiny_tied_ckpt)]], tmp_path)
    assert job.wait(60) == [USAGE, USAGE]
    for rank in (0, 1):
        _clean(job.stderr(rank))
        assert "--model" in _last_line(job.stderr(rank)) and str(tiny_tied_ckpt) in job.stderr(rank)


def test_a_rank_killed_mid_load_is_named_by_the_survivor(tiny_ckpt, tmp_path):
    argv = [*CLI, "--model", str(tiny_ckpt), "--max-new-tokens", "0"]
    job = Ranks([argv, argv], tmp_path, env={"DISTLOAD_TEST_SLOW_READ": "60", "DISTLOAD_TEST_SLOW_RANK": "1"})
    assert job.wait_for(1, "reading (slowed)", 60)
    time.sleep(0.5)                      # rank 0 has read its stage and waits for rank 1
    job.procs[1].kill()
    start = time.monotonic()
    codes = job.wait(30)
    assert time.monotonic() - start < 10
    assert codes == [ERROR, -signal.SIGKILL]
    _clean(job.stderr(0))
    assert _last_line(job.stderr(0)) == "[rank 0] ERROR rank 1 died (connection lost) during loading"


@pytest.mark.parametrize("signum, phase", [(signal.SIGINT, "load"), (signal.SIGINT, "generate"),
                                           (signal.SIGTERM, "load"), (signal.SIGTERM, "generate")])
def test_signals_stop_every_rank_with_one_line_and_its_code(tiny_ckpt, tmp_path, signum, phase):
    slow = {"load": {"DISTLOAD_TEST_SLOW_READ": "60"}, "generate": {"DISTLOAD_TEST_SLOW_STEP": "0.5"}}[phase]
    marker = {"load": "reading (slowed)", "generate": "generating (slowed)"}[phase]
    argv = [*CLI, "--model", str(tiny_ckpt), "--input-ids", "1,2,3", "--max-new-tokens", "200"]
    for attempt in range(REPEATS):
        out = tmp_path / str(attempt)
        out.mkdir()
        job = Ranks([argv, argv], out, env=slow)
        assert job.wait_for(0, marker, 60), job.stderr(0)[-2000:]
        job.signal_all(signum)       # what a terminal's Ctrl-C (or a scheduler) does
        start = time.monotonic()
        codes = job.wait(30)
        assert time.monotonic() - start < 10
        want = INTERRUPTED if signum == signal.SIGINT else TERMINATED
        assert codes == [want, want], (attempt, codes)
        for rank in (0, 1):
            _clean(job.stderr(rank))
            assert _last_line(job.stderr(rank)) == \
                f"[rank {rank}] WARNING interrupted by {signal.Signals(signum).name}: stopping"


def test_ctrl_c_under_torchrun_leaves_one_line_per_rank(tiny_ckpt):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DISTLOAD_TEST_SLOW_STEP": "0.5"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *CLI, "--model", str(tiny_ckpt), "--input-ids", "1,2,3", "--max-new-tokens", "200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            process_group=0)
    try:
        seen = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            seen.append(proc.stdout.readline())
            if "generating (slowed)" in seen[-1] or not seen[-1]:
                break
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    workers = [line for line in rest.splitlines() if line.startswith("[rank")]
    assert sorted(workers) == [f"[rank {r}] WARNING interrupted by SIGINT: stopping" for r in (0, 1)]
    assert "terminate called" not in rest     # torchrun itself reports its own signal


def test_a_failure_after_the_load_reaches_every_rank(tiny_ckpt, tmp_path):
    argv = [*CLI, "--model", str(tiny_ckpt), "--max-new-tokens", "0", "--report", str(tmp_path / "r.json")]
    job = Ranks([argv, argv], tmp_path, env={"DISTLOAD_TEST_FAIL_REPORT": "1"})
    assert job.wait(60) == [ERROR, ERROR]
    for rank in (0, 1):
        _clean(job.stderr(rank))
    assert _last_line(job.stderr(0)).endswith("OSError: [Errno 28] No space left on device (injected)")
    assert _last_line(job.stderr(1)) == ("[rank 1] ERROR rank 0 failed: OSError: [Errno 28] No space "
                                         "left on device (injected)")
    assert not list(tmp_path.glob("r.json*"))       # no report, no temporary file


def test_report_to_a_directory_is_a_usage_error_on_every_rank(tiny_ckpt, tmp_path):
    argv = [*CLI, "--model", str(tiny_ckpt), "--max-new-tokens", "0", "--report", str(tmp_path)]
    job = Ranks([argv, argv], tmp_path)
    assert job.wait(60) == [USAGE, USAGE]
    assert "is a directory" in job.stderr(0)


def test_a_report_that_cannot_be_written_leaves_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    with pytest.raises(TypeError):
        write_report({"ranks": [object()]}, str(target))   # not JSON: fails halfway
    assert list(tmp_path.iterdir()) == []
