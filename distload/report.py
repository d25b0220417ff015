"""Per-rank load figures, gathered to rank 0, printed as one table and written as JSON."""

from __future__ import annotations

import json
import os
import resource
import sys

from .plan.types import LoadPlan

__all__ = ["peak_rss_bytes", "rank_report", "job_report", "format_table", "write_report"]


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


def _modules_summary(units: list[str]) -> str:
    layers = [u.rsplit(".", 1)[-1] for u in units if ".layers." in u]
    others = [u.rsplit(".", 1)[-1] for u in units if ".layers." not in u]
    parts = []
    if layers:
        parts.append(f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}")
    parts.extend(others)
    return ", ".join(parts) or "-"


def format_table(report: dict) -> str:
    """The job's table, one row per rank, as rank 0 prints it."""
    head = f"{'rank':>4}  {'device':<8} {'modules':<34} {'tensors':>7} {'tensor MB':>10} " \
           f"{'read MB':>9} {'seconds':>8} {'GB/s':>6} {'peak RSS MB':>11}"
    rows = [head, "-" * len(head)]
    for r in report["ranks"]:
        gbps = r["bytes_read"] / r["load_seconds"] / 1e9 if r["load_seconds"] > 0 else 0.0
        rows.append(f"{r['rank']:>4}  {r['device']:<8} {_modules_summary(r['modules'])[:34]:<34} "
                    f"{r['tensors']:>7} {r['tensor_bytes'] / 1e6:>10.1f} {r['bytes_read'] / 1e6:>9.1f} "
                    f"{r['load_seconds']:>8.3f} {gbps:>6.2f} {r['peak_rss_bytes'] / 2**20:>11.0f}")
    total_read = sum(r["bytes_read"] for r in report["ranks"])
    rows.append(f"checkpoint {report['checkpoint_bytes'] / 1e6:.1f} MB of tensors; "
                f"read {total_read / 1e6:.1f} MB over {report['world_size']} rank(s)")
    for r in report["ranks"]:
        if r.get("offloaded_bytes"):
            tiers = r.get("offloaded_bytes_by_tier", {})
            rows.append(f"rank {r['rank']} offloaded: cpu {tiers.get('cpu', 0) / 1e6:.1f} MB, disk "
                        f"{tiers.get('disk', 0) / 1e6:.1f} MB; wrote {r.get('offload_bytes_written', 0) / 1e6:.1f}"
                        f" MB to the offload dir; waited {r.get('offload_wait_seconds', 0.0):.3f} s for weights")
    return "\n".join(rows)


def write_report(report: dict, path: str) -> None:
    """Write atomically: a reader never sees half a report."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
