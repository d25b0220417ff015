"""Keeping rank 0's `Pipeline.job_report` current as calls run.

Some of a rank's figures change after the load (`CURRENT_FIELDS`: the time forwards waited
for streamed offloaded weights). Each rank keeps its own `pipe.report` current, and its own
row of its `job_report` is that same dict. The other rows are copies made at load time: so
after each call that ends well, every rank whose figures can change (one with offloaded
weights) posts them under the call's number in the job's store, and rank 0 takes them into
its `job_report` (the JSON of ``--report``). Nothing is posted in a job without offloading.

Per call, on a rank that offloads: one store write; on rank 0, a wait, a read and a delete
per such rank (the others finished their part of the call before rank 0 had its result).
"""

from __future__ import annotations

import datetime
import json

import torch.distributed as dist

from ..log import logger

__all__ = ["CURRENT_FIELDS", "share_figures"]

CURRENT_FIELDS = ("offload_wait_seconds",)
# the other ranks post right after their part of a call, before rank 0 has its result
_WAIT = datetime.timedelta(seconds=10)


def _changing_ranks(pipe) -> list[int]:
    return [r["rank"] for r in pipe.job_report.get("ranks", ()) if r.get("offloaded_bytes") and r["rank"] != 0]


def share_figures(pipe) -> None:
    """Every rank, after each call that ended well (`Pipeline.run`, `serve`)."""
    channel = pipe.calls
    if channel is None or pipe.rank not in _changing_ranks(pipe) and not pipe.world.is_first:
        return
    prefix = channel.shared_key(f"figures/{channel.count}/")
    if not pipe.world.is_first:
        channel.store.set(f"{prefix}{pipe.rank}", json.dumps({k: pipe.report.get(k) for k in CURRENT_FIELDS}))
        return
    rows = {r["rank"]: r for r in pipe.job_report["ranks"]}
    for rank in _changing_ranks(pipe):
        key = f"{prefix}{rank}"
        try:
            channel.store.wait([key], _WAIT)
            rows[rank].update(json.loads(channel.store.get(key)))
            channel.store.delete_key(key)
        except (dist.DistError, RuntimeError) as exc:   # the call ended; its figures are a bonus
            logger.warning("rank %d's figures of call %d did not arrive (%s); the job report keeps "
                           "the earlier ones", rank, channel.count, exc)
