"""The pipeline's point-to-point order as eager NCCL runs it: each rank's sends and
receives of a group complete strictly in the order posted (`tests/p2p_sim.py`). A real gloo
run records every rank's operations and host waits; the replay must run to the end for
generation with one prompt, one group, and one group left after the other stopped, and for
the streamed forward, at 3 and 4 ranks (gloo itself never serializes, so the runs pass
either way)."""

from __future__ import annotations

import json

import pytest

from distload.dist import _link_ops
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config
from .mp import torchrun, worker
from .p2p_sim import replay

CASES = ("one_prompt", "one_group", "stopped_early", "forward_stream", "one_group_cap2",
         "forward_stream_cap2")


def _ev(kind, op, group=None, peer=None, shape=(1,)):
    return [kind, op] if kind == "wait" else [kind, op, group, peer, list(shape), "torch.int64"]


def test_replay_finds_a_cycle_through_a_host_wait_and_passes_its_fix():
    # rank 1 posts the next receive before forwarding; rank 0 sends it only once rank 2's
    # answer is back: a cycle on rank 1's stream that gloo never shows
    r0 = [_ev("send", 0, "w", 1), _ev("recv", 1, "ret", 2), _ev("wait", 1), _ev("send", 2, "w", 1)]
    r2 = [_ev("recv", 0, "w", 1), _ev("wait", 0), _ev("send", 1, "ret", 0)]
    stuck = [_ev("recv", 0, "w", 0), _ev("wait", 0), _ev("recv", 1, "w", 0),
             _ev("send", 2, "w", 2), _ev("wait", 1)]
    fixed = [_ev("recv", 0, "w", 0), _ev("wait", 0), _ev("send", 2, "w", 2),
             _ev("recv", 1, "w", 0), _ev("wait", 1)]
    assert "rank 1" in replay([r0, stuck, r2])
    assert replay([r0, fixed, r2]) is None
    mismatch = [_ev("recv", 0, "w", 0, (2,)), _ev("wait", 0), _ev("send", 2, "w", 2),
                _ev("recv", 1, "w", 0), _ev("wait", 1)]
    assert "receives [2]" in replay([r0, mismatch, r2])


@pytest.mark.parametrize("world", range(1, 9))
def test_nccl_link_opening_completes_on_eager_nccl(world):
    ranks = []
    for rank in range(world):
        ops = _link_ops(rank, world)
        ranks.append([[kind, i, group, peer, [1], "torch.float32"] for i, (kind, peer, group) in enumerate(ops)]
                     + [["wait", i] for i in range(len(ops))])
    assert replay(ranks) is None
    if world > 1:  # every pipeline link and the results' way back are opened
        pairs = {(r, peer, g) for r in range(world) for kind, peer, g in _link_ops(r, world) if kind == "send"}
        assert {(r, r + 1, "default") for r in range(world - 1)} <= pairs
        assert (world - 1, 0, "return") in pairs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tiny_config(vocab_size=128), tmp_path_factory.mktemp("p2p") / "llama",
                           num_shards=2, dtype="float32", seed=3)


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [3, 4])
def test_pipeline_p2p_order_completes_on_eager_nccl(ckpt, tmp_path, nproc):
    proc = torchrun(nproc, [worker("p2p_record.py"), str(tmp_path), str(ckpt)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads((tmp_path / f"p2p_rank{r}.json").read_text()) for r in range(nproc)]
    for case in CASES:
        ranks = [log[case] for log in logs]
        assert all(any(ev[0] == "send" for ev in events) for events in ranks), case
        assert replay(ranks) is None, f"{case} deadlocks on NCCL: {replay(ranks)}"
    for case in ("one_group_cap2", "forward_stream_cap2"):  # rank 0 waited on an old send mid-call
        events = logs[0][case]
        last_send = max(i for i, ev in enumerate(events) if ev[0] == "send")
        sends = {ev[1] for ev in events if ev[0] == "send"}
        assert any(ev[0] == "wait" and ev[1] in sends for ev in events[:last_send]), case
    for r in range(1, nproc - 1):  # a middle rank of the stream keeps micro-batches flowing
        assert _receives_ahead_of_sends(logs[r]["forward_stream"]) <= 1


def _receives_ahead_of_sends(events: list) -> int:
    """The most receives queued on a rank's stream between its k-th activation receive and
    its k-th activation send (the output of that micro-batch): more than the next
    micro-batch's means the send waits there for data rank 0 sends later (one stream per
    group on NCCL) and micro-batches stop flowing through this rank."""
    posted = [ev for ev in events if ev[0] != "wait"]
    acts_in = [i for i, ev in enumerate(posted) if ev[0] == "recv" and "float" in ev[5]]
    acts_out = [i for i, ev in enumerate(posted) if ev[0] == "send" and "float" in ev[5]]
    assert len(acts_in) == len(acts_out) > 1
    return max(sum(1 for ev in posted[a + 1:b] if ev[0] == "recv" and ev[2] == posted[b][2])
               for a, b in zip(acts_in, acts_out))
