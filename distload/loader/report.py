"""Per-rank load figures (`rank_report`), gathered into the job's report (`job_report`)
that rank 0 prints as a table and writes as JSON (`distload.cli.table`; README documents
every field).

Example::

    clock = PhaseClock()
    with clock("plan"):
        plan = plan_job(...)
    report = job_report(plan, gather_objects(world, stage.report), world=world,
                        phases=clock.seconds)
"""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
import time
from collections.abc import Iterator

import torch

from .. import trace
from ..plan.types import LoadPlan

__all__ = ["peak_rss_bytes", "rank_report", "job_report", "versions", "PhaseClock"]


class PhaseClock:
    """Seconds per named phase (each also a span of `distload.trace`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with trace.span(name, "load"):
            yield
        self.seconds[name] = round(time.perf_counter() - start, 6)


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


def _checkpoint_dtype(plan: LoadPlan) -> str:
    dtypes = sorted({m.dtype for s in plan.stages for m in s.reads})
    return ",".join(dtypes) or "-"


def versions() -> dict[str, str]:
    """The versions every rank of a job must share."""
    from .. import __version__

    return {"distload": __version__, "torch": str(torch.__version__)}   # a plain str: JSON, pickles


def job_report(plan: LoadPlan, ranks: list[dict], *, world=None, phases: dict | None = None) -> dict:
    """The job's report: what was loaded (model, source, revision, dtypes), with what
    (versions, hosts), how long each phase took (`phases`: this rank's ``plan`` and
    ``fetch`` seconds; ``read``, ``exchange``, ``offload``: the slowest rank's) and every
    rank's figures."""
    seconds = {f"{k}_seconds": v for k, v in (phases or {}).items()}
    for phase in ("read", "exchange", "offload", "load"):
        values = [r[f"{phase}_seconds"] for r in ranks if f"{phase}_seconds" in r]
        if values:
            seconds[f"{phase}_seconds"] = max(values)
    return {
        "world_size": plan.world_size,
        "checkpoint_bytes": plan.checkpoint_bytes,
        "model": plan.label,
        "source": dict(plan.source),
        "revision": plan.source.get("revision"),
        "dtype": plan.dtype or _checkpoint_dtype(plan),
        "checkpoint_dtype": _checkpoint_dtype(plan),
        "activation_dtype": plan.activation_dtype,
        "versions": {**versions(), "python": platform.python_version()},
        "hosts": list(world.hosts) if world is not None else [r.get("host", "") for r in ranks],
        "phases": seconds,
        "ranks": ranks,
    }
