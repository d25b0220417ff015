"""Under torchrun: record every rank's point-to-point operations (group, send/recv, peer,
shape) and host waits, in the order the comm layer posts them, for `pipe.generate` with
one prompt, with one group for the whole batch, with two groups of which one stops at once
(EOS), and for `pipe.forward_stream`; the last two again with an `Outbox` that waits on
its oldest send past 2 in flight (instead of 16), so that those host waits are replayed too. Each rank writes OUT/p2p_rank<R>.json:
{case: [event, ...]}; `tests/p2p_sim.py` replays them as eager NCCL runs them.

The recording wraps `torch.distributed` as `distload.pipeline.comm` sees it, for the
duration of one call only (`mock.patch.object`): nothing outlives the case.

    torchrun --nproc_per_node=3 p2p_record.py OUT CKPT
"""

import json
import os
import sys
from unittest import mock

import torch
import torch.distributed as dist

import distload
from distload.pipeline import comm
from pipeline_inputs import batch

out_dir, ckpt = sys.argv[1], sys.argv[2]
pipe = distload.load(ckpt, device="cpu")
ids, mask = batch(pipe.plan.config["vocab_size"])


class _Work:
    """A posted operation whose host waits are recorded."""

    def __init__(self, work, op: int, events: list) -> None:
        self._work, self._op, self._events = work, op, events

    def wait(self, *args, **kwargs):
        self._events.append(["wait", self._op])
        return self._work.wait(*args, **kwargs)

    def is_completed(self) -> bool:
        return self._work.is_completed()

    def __getattr__(self, name):
        return getattr(self._work, name)


class _RecordingDist:
    """`torch.distributed` with isend/irecv recorded into `events`."""

    def __init__(self, events: list) -> None:
        self._events = events

    def __getattr__(self, name):
        return getattr(dist, name)

    def _post(self, kind, fn, tensor, peer, group, kwargs):
        op = len(self._events)
        name = (group if group is not None else dist.group.WORLD).group_name
        self._events.append([kind, op, name, peer, list(tensor.shape), str(tensor.dtype)])
        return _Work(fn(tensor, peer, group=group, **kwargs), op, self._events)

    def isend(self, tensor, dst, group=None, **kwargs):
        return self._post("send", dist.isend, tensor, dst, group, kwargs)

    def irecv(self, tensor, src, group=None, **kwargs):
        return self._post("recv", dist.irecv, tensor, src, group, kwargs)


def recorded(fn):
    events: list = []
    with mock.patch.object(comm, "dist", _RecordingDist(events)):
        fn()
    return events


greedy = pipe.generate(ids, mask, max_new_tokens=6)


def stopping_pair():
    """Two rows and an EOS id that ends the first row's group at its first token while the
    second row's group goes on (picked from a greedy run without EOS)."""
    new = greedy[:, ids.shape[1]:]
    for a in range(len(new)):
        for b in range(len(new)):
            if a != b and int(new[a, 0]) not in new[b].tolist():
                return a, b, int(new[a, 0])
    raise AssertionError("no EOS stops one row but not another")


pair = distload.dist.run_on_rank0(pipe.world, stopping_pair)
rows = list(pair[:2])
first = pipe.rank == 0
cases = {
    "one_prompt": lambda: pipe.generate(ids[:1], mask[:1], max_new_tokens=5),
    "one_group": lambda: pipe.generate(ids, mask, max_new_tokens=5, micro_batches=1),
    "stopped_early": lambda: pipe.generate(ids[rows], mask[rows], max_new_tokens=5,
                                           micro_batches=2, eos_token_id=pair[2], pad_token_id=0),
    "forward_stream": lambda: list(pipe.forward_stream(
        [(ids, mask), ids[:3], (ids[1:], mask[1:])] if first else None, micro_batches=2)),
}
log = {name: recorded(fn) for name, fn in cases.items()}
for name in ("one_group", "forward_stream"):
    with mock.patch.object(comm, "_MAX_PENDING", 2):
        log[f"{name}_cap2"] = recorded(cases[name])
with open(os.path.join(out_dir, f"p2p_rank{pipe.rank}.json"), "w") as f:
    json.dump(log, f)
distload.dist.shutdown(pipe.world)
