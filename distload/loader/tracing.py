"""The job's trace file (``--trace PATH``): every rank's `distload.trace` recording,
gathered on rank 0 and written as one Chrome/Perfetto JSON file with a track per rank.

Gathering is point to point (each rank sends its recording to rank 0 over the control
group), so no rank but rank 0 ever holds more than its own events.

Example (every rank, at the end of a traced job)::

    trace.enable()
    pipe = distload.load("demo"); pipe.generate(ids)        # record
    write_job_trace(pipe.world, "job.json")                 # rank 0 writes the file
"""

from __future__ import annotations

import os
import pickle

import torch
import torch.distributed as dist

from .. import trace
from ..checkpoint.files import byte_view
from ..dist import World
from ..log import logger

__all__ = ["write_job_trace", "write_own_trace"]


def _labels(world: World, ranks) -> dict[int, str]:
    return {r: f"rank {r}" + (f" ({world.hosts[r]})" if r < len(world.hosts) else "") for r in ranks}


def _gather_to_rank0(world: World, obj) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order), None elsewhere."""
    if not world.distributed:
        return [obj]
    group = world.cpu_group
    if not world.is_first:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        dist.send(torch.tensor([data.numel()]), dst=0, group=group)
        dist.send(data, dst=0, group=group)
        return None
    out = [obj]
    for r in range(1, world.world_size):
        size = torch.zeros(1, dtype=torch.long)
        dist.recv(size, src=r, group=group)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, src=r, group=group)
        out.append(pickle.loads(bytes(byte_view(data))))
    return out


def write_job_trace(world: World, path: str | os.PathLike) -> None:
    """Every rank: send what this rank recorded so far to rank 0, which writes `path`
    (tracing goes on)."""
    mine = trace.snapshot() or trace.Recording()
    recordings = _gather_to_rank0(world, mine)
    if recordings is not None:
        trace.write_chrome_trace(path, dict(enumerate(recordings)),
                                 _labels(world, range(world.world_size)))
        events = sum(len(r.events) for r in recordings)
        logger.info("trace of %d events over %d rank(s) written to %s", events, len(recordings), path)


def write_own_trace(world: World | None, path: str | os.PathLike) -> None:
    """Rank 0 alone, after a failure (no collective: a peer may be gone): write what rank
    0 recorded. Nothing elsewhere."""
    if world is not None and not world.is_first:
        return
    mine = trace.snapshot()
    if mine is not None:
        trace.write_chrome_trace(path, {0: mine}, _labels(world, [0]) if world else None)
        logger.info("rank 0's part of the trace written to %s", path)
