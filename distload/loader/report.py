"""Per-rank load figures (`rank_report`), gathered into the job's report (`job_report`)
that rank 0 prints as a table and writes as JSON (`distload.cli.table`)."""

from __future__ import annotations

import resource
import sys

from ..plan.types import LoadPlan

__all__ = ["peak_rss_bytes", "rank_report", "job_report"]


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rank_report(plan: LoadPlan, rank: int, *, device: str, bytes_read: int, seconds: float,
                offloaded_bytes: int = 0, **extra) -> dict:
    stage = plan.stage(rank)
    return {
        "rank": rank,
        "device": device,
        "modules": list(stage.units),
        "tensors": len(stage.reads),
        "tensor_bytes": stage.tensor_bytes,
        "bytes_read": bytes_read,
        "load_seconds": round(seconds, 6),
        "peak_rss_bytes": peak_rss_bytes(),
        "offloaded_bytes": offloaded_bytes,
        **extra,
    }


def job_report(plan: LoadPlan, ranks: list[dict]) -> dict:
    return {"world_size": plan.world_size, "checkpoint_bytes": plan.checkpoint_bytes, "ranks": ranks}
