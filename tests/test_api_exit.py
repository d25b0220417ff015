"""A user's script of the Python API ends with its own status, never with a C++ abort
("terminate called without an active exception", SIGABRT), whatever happened in it: bad
checkpoints refused and caught, loads again, its own error after a good load, a rank that
died. The script calls nothing to shut down (see `distload.dist._leave_at_exit`).
Repeat with DISTLOAD_TEST_REPEATS=10 (the abort was a race: 5 of 8 runs before the fix)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import pytest

from .mp import Ranks, torchrun, worker

pytestmark = pytest.mark.multiprocess

REPEATS = int(os.environ.get("DISTLOAD_TEST_REPEATS", "1"))
SCRIPT = worker("api_user.py")
# stdout buffered, as a user's script has it: nothing releases the GIL between the script's
# last collective and the interpreter's exit, where the abort was
BUFFERED = {"PYTHONUNBUFFERED": ""}
ABORTS = ("terminate called", "Fatal Python error", "SIGABRT", "Signal 6")


def _no_abort(text: str) -> None:
    for sign in ABORTS:
        assert sign not in text, text[-3000:]
    # a rank killed by a signal of its own making (abort, segfault); torchrun's SIGTERM to
    # the ranks still ending when another failed (-15) is the launcher's, not a crash
    assert not re.search(r"exitcode\s+: -(6|11) ", text), text[-3000:]


@pytest.fixture(scope="module")
def bad_checkpoints(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with one shard's header garbled, and with one shard missing."""
    root = tmp_path_factory.mktemp("bad")
    corrupt, missing = root / "corrupt", root / "missing"
    shutil.copytree(tiny_ckpt, corrupt)
    shutil.copytree(tiny_ckpt, missing)
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    with open(corrupt / shard, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        f.write(b"{" + b"\xff" * (length - 1))          # the header's JSON made unreadable
    (missing / shard).unlink()
    return [str(corrupt), str(missing), f"tiny-memory:{tiny_ckpt}"]


@pytest.mark.parametrize("nproc", [2, 3])
def test_caught_faults_then_loads_end_cleanly(tiny_ckpt, bad_checkpoints, nproc):
    for _ in range(REPEATS):
        proc = torchrun(nproc, [SCRIPT, "faults", str(tiny_ckpt), *bad_checkpoints], timeout=240, env=BUFFERED)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        _no_abort(out)
        for rank in range(nproc):
            # every fault raised a distload error on every rank: rank 0 the cause's own
            # type, the others the RankError that carries it
            # (the ranks share torchrun's stdout: two ranks' lines may run together)
            caught = re.findall(rf"rank {rank} caught ([A-Za-z]+?Error)", proc.stdout)
            expected = ["CheckpointError", "CheckpointError", "PlanError"] if rank == 0 else ["RankError"] * 3
            assert caught == expected, proc.stdout
            assert f"rank {rank} ends" in proc.stdout
        assert "rank 0 generated 3 tokens" in proc.stdout


def test_own_error_after_a_good_load_keeps_its_status(tiny_ckpt):
    for _ in range(REPEATS):
        proc = torchrun(3, [SCRIPT, "own_error", str(tiny_ckpt)], timeout=240, env=BUFFERED)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-3000:]
        _no_abort(out)
        assert "ValueError: the script's own error" in out
        assert re.search(r"rank\s+: 2 .*\n\s+exitcode\s+: 1 ", out), out[-3000:]


def test_survivors_of_a_dead_rank_catch_it_and_exit_with_their_status(tiny_ckpt, tmp_path):
    for attempt in range(REPEATS):
        out = tmp_path / str(attempt)
        out.mkdir()
        job = Ranks([[SCRIPT, "rank_dies", str(tiny_ckpt)]] * 2, out, env=BUFFERED)
        assert job.wait(120) == [3, 9]
        text = (out / "rank0.out").read_text()
        _no_abort(job.stderr(0) + text)
        assert "rank 0 caught RankError: rank 1 died" in text, text + job.stderr(0)
