"""Watching a job: the trace recorder (off: a shared no-op; on: spans from every thread
as valid trace-event JSON), the job's progress board and rank 0's monitor (log lines with
bytes and rates, a stalled rank named with its stage and file), waits that name the late
rank, and, under torchrun, all of it end to end through the CLI: one writer of progress,
the stall message, the trace file (a track per rank, every read's bytes summing to the
checkpoint, decode steps on each stage) and the report's fields."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
import torch.distributed as dist

from distload import trace
from distload.checkpoint import index_checkpoint
from distload.dist import World
from distload.errors import LoadError, RankError
from distload.loader.board import JobBoard
from distload.loader.prepare import PlanRequest, plan_load
from distload.loader.progress import ProgressMonitor, RankProgress
from distload.loader.waits import FLOOR_SECONDS, wait_for_ranks, work_limit

from .mp import torchrun, worker


@pytest.fixture(scope="module")
def plan(tiny_ckpt):
    return plan_load(PlanRequest(model=str(tiny_ckpt), world_size=2))


def _world(rank: int, size: int = 2) -> World:
    return World(rank, size, rank, torch.device("cpu"), "gloo", nodes=(0,) * size)


def _boards(size: int = 2):
    """One board per rank over one in-process store (as the ranks of a job share theirs)."""
    store = dist.HashStore()
    return [JobBoard(store, "test/", size, r) for r in range(size)]


# ----------------------------------------------------------------------------- trace

def test_trace_off_is_a_shared_no_op():
    assert not trace.active()
    a, b = trace.span("x", bytes=1), trace.span("y")
    assert a is b
    with a as s:
        s.set(more=1)
    trace.instant("nothing")
    assert trace.snapshot() is None and trace.disable() is None


def test_trace_records_spans_of_every_thread_as_trace_events(tmp_path):
    trace.enable()
    try:
        with trace.span("outer", "load", bytes=3) as s:
            s.set(done=True)

        def work():
            with trace.span("read", "io", file="f", bytes=5):
                pass

        t = threading.Thread(target=work, name="reader-1")
        t.start()
        t.join()
        trace.instant("mark")
        with pytest.raises(KeyError), trace.span("fails"):
            raise KeyError("x")
    finally:
        rec = trace.disable()
    assert not trace.active()
    names = [e[0] for e in rec.events]
    assert names == ["outer", "read", "mark", "fails"]
    assert rec.events[0][6] == {"bytes": 3, "done": True} and rec.events[3][6] == {"error": "KeyError"}
    assert len(rec.threads) == 2 and "reader-1" in rec.threads.values()
    path = tmp_path / "t.json"
    trace.write_chrome_trace(path, {0: rec, 1: trace.Recording()}, labels={0: "rank 0 (a)"})
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    assert {(e["pid"], e["args"].get("name")) for e in meta if e["name"] == "process_name"} == {
        (0, "rank 0 (a)"), (1, "rank 1")}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 and {"pid", "tid", "name", "cat"} <= set(e) for e in spans)
    assert min(e["ts"] for e in events if e["ph"] != "M") == 0
    assert [e for e in events if e["ph"] == "i"][0]["s"] == "t"


def test_trace_caps_its_events():
    trace.enable(max_events=3)
    for i in range(5):
        trace.instant(f"e{i}")
    rec = trace.disable()
    assert len(rec.events) == 3 and rec.dropped == 2
    assert "2 events dropped" in json.dumps(trace.chrome_trace({0: rec}))


def test_a_traced_forward_has_a_span_per_micro_batch(tiny_ckpt):
    import distload

    pipe = distload.load(str(tiny_ckpt), device="cpu")
    trace.enable()
    try:
        pipe.forward(torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), micro_batches=2)
    finally:
        rec = trace.disable()
    spans = [e for e in rec.events if e[0] == "forward"]
    assert [(e[6]["micro_batch"], e[6]["rows"], e[6]["tokens"]) for e in spans] == [
        (0, "0-2", 3), (1, "2-3", 3)]


# ----------------------------------------------------------------------------- progress

def test_monitor_logs_the_jobs_bytes_and_names_a_stalled_rank(plan, caplog):
    boards = _boards()
    mine = [RankProgress(boards[r], plan, r, root="/ckpt") for r in range(2)]
    for r in range(2):  # as rank 0 makes them in JobBoard.open
        boards[0].store.compare_set(boards[0]._state_key(r), "", json.dumps({"phase": "starting"}))
    totals = [s.tensor_bytes for s in plan.stages]
    monitor = ProgressMonitor(boards[0], plan, interval_s=1.0, stall_s=5.0)
    t0 = monitor.started
    mine[0].phase("reading")
    mine[0]("/ckpt/model-00001-of-00003.safetensors", totals[0])
    mine[0].phase("waiting")
    mine[1].phase("reading")
    mine[1]("/ckpt/model-00003-of-00003.safetensors", totals[1] // 2)
    with caplog.at_level(logging.INFO, logger="distload"):
        monitor.poll(now=t0 + 2)
        assert len(caplog.records) == 1
        line = caplog.records[0].getMessage()
        done = (totals[0] + totals[1] // 2) / 1e6
        assert f"{done:.1f} MB of {sum(totals) / 1e6:.1f} MB" in line and "GB/s" in line and "ETA" in line
        assert "1 of 2 rank(s) reading" in line
        monitor.poll(now=t0 + 2.5)      # within the interval: no line
        assert len(caplog.records) == 1
        monitor.poll(now=t0 + 7.5)      # rank 1: nothing new for 5.5 s
        stalls = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert stalls == [f"rank 1 has read nothing for 6 s (stage: layers.2-3, norm, lm_head; reading; "
                          f"file model-00003-of-00003.safetensors; {totals[1] // 2 / 1e6:.1f} MB of "
                          f"{totals[1] / 1e6:.1f} MB read)"]
        monitor.poll(now=t0 + 9)        # said once per stall period
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        mine[1]("/ckpt/model-00003-of-00003.safetensors", 1)
        mine[1].flush()
        monitor.poll(now=t0 + 13)       # it moved: the clock starts again
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        mine[1].phase("waiting")        # waiting for others is not a stall
        monitor.poll(now=t0 + 30)
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_rank_progress_pushes_at_most_every_fifth_of_a_second(plan):
    board = _boards(1)[0]
    pushes = []
    board.set_state = lambda rank, state: pushes.append(state)
    mine = RankProgress(board, plan, 0, root="/ckpt")
    mine.phase("reading")
    for _ in range(1000):
        mine("/ckpt/a.safetensors", 10)
    assert mine.bytes == 10_000
    assert 2 <= len(pushes) <= 3    # the phase, the new file, maybe one more
    assert pushes[-1]["file"] == "a.safetensors"


# ----------------------------------------------------------------------------- waits

def test_limits_scale_with_the_bytes_and_timeout_overrides():
    assert work_limit(0) == FLOOR_SECONDS
    assert work_limit(100 * 10**9) == pytest.approx(10_000.0)
    assert work_limit(100 * 10**9, override=5.0) == 5.0


def test_a_wait_that_runs_out_names_the_late_rank_and_what_it_does(plan):
    boards = _boards()
    RankProgress(boards[1], plan, 1, root="/ckpt")("/ckpt/model-00002-of-00003.safetensors", 1000)
    boards[1].set_state(1, {**boards[1].state(1), "phase": "reading"})
    with pytest.raises(LoadError) as info:
        wait_for_ranks(boards[0], _world(0), "read", nbytes=10**9, override=0.3, what="reading",
                       plan=plan)
    message = str(info.value)
    assert message.startswith("rank 1 not done reading after 0.3 s (--timeout): rank 1 is reading")
    assert "file model-00002-of-00003.safetensors" in message and "stage layers.2-3" in message
    with pytest.raises(LoadError, match="the other ranks stopped waiting for this one: rank 0: rank 1"):
        wait_for_ranks(boards[1], _world(1), "read", nbytes=10**9, override=0.3, what="reading")


def test_rank_0_names_a_rank_whose_heartbeat_stopped(plan, monkeypatch):
    import distload.loader.waits as waits

    monkeypatch.setattr(waits, "DEAD_SECONDS", 0.5)
    boards = _boards()
    for r in range(2):
        boards[0].store.compare_set(boards[0]._state_key(r), "", json.dumps({"phase": "starting"}))
    RankProgress(boards[1], plan, 1).phase("reading")     # then nothing: no heartbeat
    with pytest.raises(RankError, match=r"^rank 1 has not been heard of for 0 s while reading: it died"):
        wait_for_ranks(boards[0], _world(0), "read", nbytes=0, override=30.0, what="reading")
    with pytest.raises(LoadError, match="stopped waiting for this one: rank 1 has not been heard of"):
        wait_for_ranks(boards[1], _world(1), "read", nbytes=0, override=30.0, what="reading")


def test_ranks_that_all_arrive_go_on():
    boards = _boards()
    errors = []

    def rank(r):
        try:
            wait_for_ranks(boards[r], _world(r), "tiers", nbytes=0, override=5.0, what="x")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ----------------------------------------------------------------------------- end to end

@pytest.mark.multiprocess
def test_cli_progress_stall_trace_and_report(tiny_ckpt, tmp_path):
    """2 ranks, rank 1 stalled 2.5 s in its first file: rank 0 alone logs progress lines
    and names rank 1; the trace has a track per rank whose reads add up to the checkpoint;
    the report has the job's fields."""
    trace_path, report_path = tmp_path / "t.json", tmp_path / "r.json"
    env = {"DISTLOAD_TEST_SLOW_RANK": "1", "DISTLOAD_TEST_SLOW_SECONDS": "2.5",
           "DISTLOAD_PROGRESS_SECONDS": "0.3", "DISTLOAD_STALL_SECONDS": "1"}
    proc = torchrun(2, [worker("cli_observed.py"), "--device", "cpu", "--model", str(tiny_ckpt),
                        "--trace", str(trace_path), "--report", str(report_path),
                        "--input-ids", "1,2,3", "--input-ids", "4,5", "--max-new-tokens", "3"],
                    env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout: the results only, one line per prompt
    assert len(proc.stdout.splitlines()) == 2 and "rank" not in proc.stdout
    progress = [line for line in proc.stderr.splitlines() if "loading tiny:" in line]
    assert len(progress) >= 2 and all(line.startswith("[rank 0] INFO loading tiny: ") for line in progress)
    assert all(" MB of " in line and "GB/s" in line for line in progress)
    stalls = [line for line in proc.stderr.splitlines() if "has read nothing" in line]
    assert stalls and all(line.startswith("[rank 0] WARNING rank 1 has read nothing for ") for line in stalls)
    assert "stage: layers.2-3, norm, lm_head; reading; file model-0000" in stalls[0]

    events = json.loads(trace_path.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(names) == [0, 1] and names[1].startswith("rank 1")
    reads = [e for e in events if e["name"] == "read" and e["cat"] == "io"]
    assert sum(e["args"]["bytes"] for e in reads) == index_checkpoint(tiny_ckpt).tensor_bytes
    assert {e["pid"] for e in reads} == {0, 1}
    for pid in (0, 1):
        mine = {e["name"] for e in events if e["pid"] == pid}
        assert {"read stage", "wait for ranks", "exchange tied", "prefill", "decode step",
                "recv wait"} <= mine
    assert {e["name"] for e in events if e["pid"] == 0} >= {"plan", "header", "first token"}

    report = json.loads(report_path.read_text())
    assert report["model"] == "tiny" and report["source"]["kind"] == "local"
    assert report["dtype"] == "bfloat16" and report["versions"]["torch"] == torch.__version__
    assert len(report["hosts"]) == 2 and report["revision"] is None
    assert set(report["phases"]) >= {"plan_seconds", "read_seconds", "exchange_seconds",
                                     "offload_seconds", "first_forward_seconds"}
    assert report["phases"]["read_seconds"] >= 2.5          # rank 1's stall
    assert report["generation"]["generated_tokens"] == 6
    assert all({"read_seconds", "exchange_seconds", "offload_seconds", "host"} <= set(r)
               for r in report["ranks"])
