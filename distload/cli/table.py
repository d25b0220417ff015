"""Rank 0's view of a load for people and tools: the job's table, and the report as JSON.

Example::

    print(format_table(pipe.job_report))
    write_report(pipe.job_report, "load.json")
"""

from __future__ import annotations

import contextlib
import json
import os

from ..plan.explain import short_units

__all__ = ["format_offload_waits", "format_table", "format_generation", "write_report"]


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, the cut marked (``layers.0-7, norm, lm_h…``)."""
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(report: dict) -> str:
    """The job's table, one row per rank (with its host: a job may span nodes), as rank
    0 prints it; then what each node downloaded, where it downloaded anything."""
    ranks = report["ranks"]
    width = min(16, max([4, *(len(r.get("host", "")) for r in ranks)]))
    head = f"{'rank':>4}  {'host':<{width}} {'device':<8} {'modules':<34} {'tensors':>7} {'tensor MB':>10} " \
           f"{'read MB':>9} {'seconds':>8} {'GB/s':>6} {'peak RSS MB':>11}"
    rows = [head, "-" * len(head)]
    for r in ranks:
        gbps = r["bytes_read"] / r["load_seconds"] / 1e9 if r["load_seconds"] > 0 else 0.0
        rows.append(f"{r['rank']:>4}  {r.get('host', '')[:width]:<{width}} {r['device']:<8} "
                    f"{_fit(short_units(r['modules']), 34):<34} "
                    f"{r['tensors']:>7} {r['tensor_bytes'] / 1e6:>10.1f} {r['bytes_read'] / 1e6:>9.1f} "
                    f"{r['load_seconds']:>8.3f} {gbps:>6.2f} {r['peak_rss_bytes'] / 2**20:>11.0f}")
    total_read = sum(r["bytes_read"] for r in ranks)
    rows.append(f"checkpoint {report['checkpoint_bytes'] / 1e6:.1f} MB of tensors; "
                f"read {total_read / 1e6:.1f} MB over {report['world_size']} rank(s)")
    phases = report.get("phases", {})
    shown = [f"{name} {phases[f'{name}_seconds']:.3f} s" for name in ("plan", "fetch", "read", "exchange",
                                                                       "offload")
             if phases.get(f"{name}_seconds") is not None]
    if shown:
        rows.append(f"phases (slowest rank): {', '.join(shown)}")
    for r in ranks:
        if r.get("fetched_bytes"):  # on the node leader's row: what its node downloaded
            rows.append(f"rank {r['rank']} ({r.get('host', '?')}) downloaded {r['fetched_bytes'] / 1e6:.1f} MB "
                        "for its node")
    for r in ranks:
        if r.get("offloaded_bytes"):
            tiers = r.get("offloaded_bytes_by_tier", {})
            rows.append(f"rank {r['rank']} offloaded: cpu {tiers.get('cpu', 0) / 1e6:.1f} MB, disk "
                        f"{tiers.get('disk', 0) / 1e6:.1f} MB; wrote {r.get('offload_bytes_written', 0) / 1e6:.1f}"
                        f" MB to the offload dir")
    return "\n".join(rows)


def format_offload_waits(report: dict) -> str:
    """After calls ran: how long each offloading rank's forwards waited for its streamed
    weights (``offload_wait_seconds``, current in rank 0's job report); "" without offloading."""
    waits = [f"rank {r['rank']} {r.get('offload_wait_seconds', 0.0):.3f} s" for r in report["ranks"]
             if r.get("offloaded_bytes")]
    return f"waited for offloaded weights: {', '.join(waits)}" if waits else ""


def format_generation(figures: dict) -> str:
    """The generation's figures (the report's ``generation``) in one line."""
    def rate(key: str) -> str:
        value = figures.get(key)
        return "-" if value is None else f"{value:.1f} tokens/s"

    ttft = figures.get("time_to_first_token_seconds")
    return (f"generated {figures['generated_tokens']} tokens for {figures['prompts']} prompts in "
            f"{figures['seconds']:.3f} s; first token after "
            f"{'-' if ttft is None else f'{ttft:.3f} s'}; prefill {rate('prefill_tokens_per_second')}, "
            f"decode {rate('decode_tokens_per_second')}")


def write_report(report: dict, path: str) -> None:
    """Write atomically: a reader never sees half a report, and a failed write (a full
    disk) leaves no temporary file behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
