"""`--explain`: the plan as text a person reads before loading anything.

Per rank: its run of units (decoder layers as a range), the checkpoint bytes it reads
(a quantized checkpoint's: quantized weights and scales), bytes on each tier (decoded), the bytes kept
free on the device (KV cache, activations, streaming slots) and whether streamed units are
prefetched, the host memory the load needs, its share of the estimated cost, and why its
stage ends where it does (which budget bound it). Pure: a `LoadPlan` in, a string out.

Example::

    plan = distload.plan_job("./llama", max_memory={0: "20GiB", "cpu": "64GiB"})
    sys.stdout.write(explain_plan(plan))
"""

from __future__ import annotations

import re

from ..io.reader import DEFAULT_STAGING_BYTES
from .budget import format_bytes
from .types import LoadPlan, StagePlan, Tier

__all__ = ["explain_plan", "compress_units", "short_units"]

_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


def compress_units(names) -> str:
    """``["model.embed_tokens", "model.layers.0", ..., "model.layers.9"]`` →
    ``"model.embed_tokens, model.layers.0-9"``: consecutive numbered siblings as a range.

    Example::

        compress_units(["a.1", "a.2", "a.3", "head"])   # 'a.1-3, head'
    """
    parts: list[str] = []
    run: tuple[str, int, int] | None = None  # (prefix, first, last)

    def flush() -> None:
        if run is not None:
            prefix, first, last = run
            parts.append(f"{prefix}.{first}" if first == last else f"{prefix}.{first}-{last}")

    for name in names:
        m = _NUMBERED.match(name)
        if m and run is not None and m.group(1) == run[0] and int(m.group(2)) == run[2] + 1:
            run = (run[0], run[1], run[2] + 1)
            continue
        flush()
        run = (m.group(1), int(m.group(2)), int(m.group(2))) if m else None
        if not m:
            parts.append(name)
    flush()
    return ", ".join(parts)


def short_units(names) -> str:
    """`compress_units` for people: each run of units by its last name (and the range of a
    numbered run), whatever the model calls its parts; "-" for none.

    Example::

        short_units(["model.embed_tokens", "model.layers.0", "model.layers.1"])   # 'embed_tokens, layers.0-1'
    """
    parts = []
    for part in compress_units(names).split(", "):
        head, _, tail = part.rpartition(".")
        numbered = tail.replace("-", "").isdigit()
        parts.append(f"{head.rpartition('.')[2]}.{tail}" if numbered and head else tail or part)
    return ", ".join(parts) or "-"


def _held(plan: LoadPlan, stage: StagePlan) -> dict[str, int]:
    if stage.held_bytes:
        return {t: int(stage.held_bytes.get(t, 0)) for t in Tier.ALL}
    return stage.tier_bytes(plan.unit_bytes)


def _slots(stage: StagePlan) -> str:
    if not stage.stream_slots:
        return "-"
    return "2 (prefetch)" if stage.stream_slots > 1 else "1 (no prefetch)"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def explain_plan(plan: LoadPlan) -> str:
    """The plan as a few lines of text (ends with a newline).

    Example::

        print(explain_plan(plan))   # from a script; the CLI writes it for --explain
    """
    costs = [s.plan_cost or s.cost for s in plan.stages]
    total_cost = sum(costs) or 1.0
    lines = [f"distload plan: {plan.label} ({plan.format}), {plan.world_size} rank(s), "
             f"dtype {plan.dtype or 'as stored'}, {format_bytes(plan.checkpoint_bytes)} of tensors"]
    kept = ", ".join(plan.no_split_classes) or "none named"
    lines.append(f"units ({len(plan.no_split_units)}, in execution order; kept whole: {kept}): "
                 f"{compress_units(plan.no_split_units)}")
    if plan.run_shape:
        workload = plan.run_shape.get("workload", "any")
        what = {"forward": "activations and full-sequence logits, no KV cache",
                "generate": "KV cache and activations; logits for the last position only",
                }.get(workload, "KV cache, activations and full-sequence logits")
        lines.append(f"reserved for running: batch {plan.run_shape['max_batch_size']} x "
                     f"{plan.run_shape['max_seq_len']} tokens, workload {workload} ({what})")
    sends = [(s.rank, key, dst) for s in plan.stages for key, dst in s.sends]
    for src, key, dst in sends:
        lines.append(f"tied: {key} is read once by rank {src} and sent to rank {dst}")
    decoded = {d["method"] for s in plan.stages for d in s.decode.values()}
    if decoded:
        lines.append(f"quantized checkpoint ({', '.join(sorted(decoded))}): each rank reads its weights' "
                     f"quantized bytes and scales ('read') and holds them decoded to "
                     f"{plan.dtype} (device, cpu, disk)")
    rows = [["rank", "units", "read", "device", "cpu", "disk", "reserved", "slots", "device budget",
             "cost share"]]
    for s, cost in zip(plan.stages, costs):
        held = _held(plan, s)
        budget = s.budget.get("device") if s.budget else None
        rows.append([str(s.rank), compress_units(s.units), format_bytes(s.tensor_bytes),
                     format_bytes(held[Tier.DEVICE]),
                     format_bytes(held[Tier.CPU]), format_bytes(held[Tier.DISK]),
                     format_bytes(s.reserved_bytes), _slots(s),
                     format_bytes(budget) if budget is not None else "-", f"{cost / total_cost:.1%}"])
    lines += [""] + _table(rows) + [""]
    for s in plan.stages:
        held = _held(plan, s)
        lines.append(f"rank {s.rank}: {s.bound or 'bytes-balanced split (no planner budgets)'}")
        if s.reserve:
            lines.append(f"        reserve {format_bytes(s.reserved_bytes)}: KV cache "
                         f"{format_bytes(s.reserve.get('kv', 0))} + activations "
                         f"{format_bytes(s.reserve.get('work', 0))} + streaming "
                         f"{format_bytes(s.reserve.get('stream', 0))}")
        # a CUDA reader double-buffers its pinned staging (one buffer reads while the
        # other's copy to the device runs); a CPU reader needs one
        staging = s.reserve.get("host_staging", 0) if s.reserve else 0
        disk_staging = (f" + {format_bytes(staging)} pinned disk-tier staging ({s.stream_slots} x "
                        f"{format_bytes(staging // max(s.stream_slots, 1))}, in the cpu budget)"
                        if staging else "")
        lines.append(f"        host memory: {format_bytes(held[Tier.CPU])} cpu tier (plus the device "
                     f"tier where the device is the CPU){disk_staging} + read staging, at most "
                     f"{format_bytes(DEFAULT_STAGING_BYTES)} per reader thread on the CPU, "
                     f"2 x {format_bytes(DEFAULT_STAGING_BYTES)} pinned on a GPU; no whole state "
                     "dict is ever built")
        if s.budget.get("source"):
            lines.append(f"        budgets from {s.budget['source']}")
    slowest = max(range(len(costs)), key=lambda r: (costs[r], -r))
    lines.append("slots: units streamed in at once — 2: the next one is prefetched while one "
                 "runs; 1: no prefetch (two did not fit, or keeping one more unit resident "
                 "was worth more); -: nothing streamed")
    lines.append(f"slowest stage: rank {slowest}, {costs[slowest]:.4g} FLOP-equivalents per token "
                 f"({costs[slowest] / total_cost:.1%} of the total)")
    return "\n".join(lines) + "\n"
