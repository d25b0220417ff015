"""The single-process plan behind a device map: accelerate's order — the GPUs' stages in
index order, then what does not fit them on "cpu", then on "disk" — with every tier's
budget respected and the slowest stage as cheap as possible within that order.

Pure, like `distload.plan.planner`, whose stage model (`distload.plan.stage`) it shares:

* Each GPU holds a contiguous run of units, all resident (reserve included): no GPU
  streams, so no offloaded unit ever sits between two GPUs' stages.
* The *tail* — the units after the last GPU's stage, possibly none — is offloaded: its
  longest prefix that fits ``cpu`` on the CPU tier, the rest on the disk tier (at most
  ``disk``). Anything on disk streams through pinned host staging (``slots x`` the
  tail's largest unit, as `distload.plan.stage` counts it for a GPU rank), which comes out
  of ``cpu`` first. It runs on the *main* GPU (the first, as accelerate's hooks run offloaded
  modules), which keeps room for ``slots x`` the tail's largest unit (plus the tail's KV
  cache and activations when a run shape is reserved). The tail is one more stage: its
  cost is its FLOPs plus the streaming penalty, 1 or 2 slots as in the stage model.
* The plan minimises the costliest stage: for each number of slots and each bound on the
  tail's largest unit (one of the units' sizes), one dynamic programme over the GPUs (the
  main GPU's budget reduced by that room) gives the best split of every prefix; every
  tail start is then tried. Exact without a run reserve; with one, the tail's reserve is
  found by iterating to a fixed point (always within budget, possibly not the optimum).

`single_process_plan` turns such a map (any device map, translated to a `Placement`
per parameter) into the world-of-one `LoadPlan` that `distload.loader.load_stage` runs:
one loading path for `distload.load` and accelerate's names alike.

Example::

    plan = partition_sequential(loads, [20 * 10**9, 20 * 10**9], cpu=100 * 10**9, disk=None)
    plan.gpus_used, plan.partition.bounds, plan.partition.stages[-1].tiers
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..checkpoint.types import TensorMeta
from ..checkpoint.dtypes import dtype_from_name
from ..errors import PlanError
from .budget import RankBudget, format_bytes
from .planner import Partition, best_splits, choose_bounds, finish
from .stage import INF, PlannerOptions, StageLayout, StageModel, UnitLoad
from .types import LoadPlan, ParamSource, StagePlan, Tier

__all__ = ["SequentialPlan", "partition_sequential", "Placement", "single_process_plan"]


@dataclass(frozen=True)
class SequentialPlan:
    """`partition_sequential`'s answer: the first `gpus_used` stages of `partition` are
    those GPUs' (in index order); a last stage beyond them, when `tail` is set, holds the
    offloaded units (tiers "cpu"/"disk"), streamed onto the first GPU."""

    partition: Partition
    gpus_used: int
    tail: bool


@dataclass(frozen=True)
class _Candidate:
    key: tuple          # (bottleneck, tail penalty, one slot?, -tail start)
    slots: int
    room: int           # bytes the main GPU keeps for running the tail
    start: int          # the tail's first unit (n: no tail)
    gpus: int


def partition_sequential(units: Sequence[UnitLoad], gpu_budgets: Sequence[int], *, cpu: int,
                         disk: int | None, options: PlannerOptions | None = None) -> SequentialPlan:
    """Place `units` (in execution order) on GPUs with `gpu_budgets` bytes each, then
    "cpu" (`cpu` bytes), then "disk" (`disk` bytes, None: unlimited) — see the module
    docstring. Raises `PlanError` when nothing fits.

    Example::

        partition_sequential(loads, [10**9], cpu=2 * 10**9, disk=None).partition.tiers
    """
    if not gpu_budgets:
        raise ValueError("partition_sequential needs at least one GPU budget")
    model = StageModel(units, options)
    n, g = model.n, len(gpu_budgets)
    best: _Candidate | None = None
    tables = {}

    def splits(room: int):
        if room not in tables:
            budgets = [RankBudget(gpu_budgets[0] - room, 0, 0)] + [RankBudget(b, 0, 0) for b in gpu_budgets[1:]]
            tables[room] = best_splits(model, budgets, every_end=True)
        return tables[room]

    def gpus_for(table, t: int) -> tuple[float, int]:
        """(bottleneck, GPUs used) of units 0..t-1 on the GPUs: the most GPUs among the best."""
        if t == 0:
            return 0.0, 0
        value, used = INF, 0
        for r in range(1, min(g, t) + 1):
            if table[r][t] <= value:
                value, used = table[r][t], r
        return value, used

    value, used = gpus_for(splits(0), n)
    if value < INF:
        best = _Candidate((value, 0.0, False, -n), 0, 0, n, used)
    for slots in range(model.opt.stream_slots, 0, -1):
        for bound in sorted(set(model.own), reverse=True):
            extra = 0
            while True:   # the tail's reserve, to a fixed point (0 without a run reserve)
                room = slots * bound + extra
                if room > gpu_budgets[0]:
                    break
                table = splits(room)
                found = None
                for t in range(n):
                    if model.biggest(t, n) > bound:
                        continue
                    tail = _tail_cost(model, t, slots, cpu, disk)
                    gpu, used = gpus_for(table, t)
                    value = max(gpu, tail)
                    if value == INF:
                        continue
                    key = (value, tail - model.compute(t, n), slots == 1, -t)
                    if found is None or key < found.key:
                        found = _Candidate(key, slots, room, t, used)
                if found is None:
                    break
                kv, work = model.reserve(found.start, n)
                if kv + work <= extra:
                    if best is None or found.key < best.key:
                        best = found
                    break
                extra = kv + work
    if best is None:
        raise PlanError(_diagnose(model, gpu_budgets, cpu, disk))
    return _assemble(model, gpu_budgets, cpu, best)


def _tail_cost(model: StageModel, t: int, slots: int, cpu: int, disk: int | None) -> float:
    _, on_cpu, on_disk, _ = _tail_split(model, t, cpu, slots)
    if on_disk == INF or (disk is not None and on_disk > disk):
        return INF
    opt = model.opt
    factor = opt.no_prefetch_factor if slots == 1 and opt.stream_slots == 2 else 1.0
    return model.compute(t, model.n) + factor * (opt.cpu_penalty * on_cpu + opt.disk_penalty * on_disk)


def _tail_split(model: StageModel, t: int, cpu: int, slots: int) -> tuple[int, int, float, int]:
    """(k, cpu bytes, disk bytes, pinned staging bytes) of the tail t..n-1: its longest
    prefix t..k-1 within `cpu` on the CPU tier, the rest on disk. When anything goes to
    disk, the streamer's pinned staging for it — `slots` x the tail's largest unit, as
    `StageModel.layout` counts it for a GPU rank (the tail always runs on a GPU) — is host
    memory beside the CPU tier, so it comes out of `cpu` first; disk bytes INF when not
    even the staging fits."""
    def fill(room: int) -> tuple[int, int]:
        lo, hi = t, model.n
        while lo < hi:    # the largest k with nbytes(t, k) <= room (nbytes is monotone)
            mid = (lo + hi + 1) // 2
            if model.nbytes(t, mid) <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo, model.nbytes(t, lo)

    total = model.nbytes(t, model.n)
    k, on_cpu = fill(cpu)
    staging = slots * model.biggest(t, model.n)
    if on_cpu == total or not staging:
        return k, on_cpu, total - on_cpu, 0
    if staging > cpu:
        return k, on_cpu, INF, staging
    k, on_cpu = fill(cpu - staging)
    return k, on_cpu, total - on_cpu, staging


def _assemble(model: StageModel, gpu_budgets: Sequence[int], cpu: int, c: _Candidate) -> SequentialPlan:
    n, value = model.n, c.key[0]
    budgets = [RankBudget(gpu_budgets[0] - c.room, 0, 0)] + [RankBudget(b, 0, 0) for b in gpu_budgets[1:]]
    if c.gpus:
        bounds = choose_bounds(model, budgets[:c.gpus], value, end=c.start)
        part = finish(model, budgets[:c.gpus], bounds, value)
        stages, reasons = list(part.stages), list(part.reasons)
    else:
        bounds, stages, reasons = (0,), [], []
    if c.start == n:
        return SequentialPlan(Partition(tuple(bounds), tuple(stages), value, tuple(reasons)), c.gpus, False)
    k, on_cpu, on_disk, staging = _tail_split(model, c.start, cpu, c.slots)
    kv, work = model.reserve(c.start, n)
    largest = model.biggest(c.start, n)
    cost = _tail_cost(model, c.start, c.slots, cpu, None)
    tiers = (Tier.CPU,) * (k - c.start) + (Tier.DISK,) * (n - k)
    stages.append(StageLayout(c.start, n, tiers, (0, on_cpu, int(on_disk)), model.compute(c.start, n), cost,
                              kv + work + c.slots * largest, c.slots, largest, kv, work, staging))
    prefetch = "2 slots (prefetch)" if c.slots == 2 else "1 slot (no prefetch)"
    pinned = f" (+ {format_bytes(staging)} of pinned staging for it in 'cpu')" if staging else ""
    reasons.append(f"after the GPUs, accelerate's order: {k - c.start} unit(s) "
                   f"({format_bytes(on_cpu)}) on cpu, then {n - k} ({format_bytes(on_disk)}) on disk{pinned}, "
                   f"streamed onto the first GPU with {prefetch} of {format_bytes(largest)}")
    return SequentialPlan(Partition(tuple(bounds) + (n,), tuple(stages), value, tuple(reasons)), c.gpus, True)


def _diagnose(model: StageModel, gpu_budgets: Sequence[int], cpu: int, disk: int | None) -> str:
    total = model.nbytes(0, model.n)
    biggest = max(model.own)
    if biggest > gpu_budgets[0] and biggest > max(gpu_budgets):
        return (f"the largest unit ({format_bytes(biggest)}) fits no GPU budget (largest "
                f"{format_bytes(max(gpu_budgets))}), not even streamed onto the first GPU: raise "
                "max_memory for the GPUs")
    return (f"the weights ({format_bytes(total)}, plus reserves) fit neither the GPUs "
            f"({', '.join(format_bytes(b) for b in gpu_budgets)}) nor, after them, 'cpu' "
            f"({format_bytes(cpu)}) and 'disk' ({format_bytes(disk)}), the first GPU keeping room to "
            "stream the offloaded units and 'cpu' holding the pinned staging of those on disk: raise "
            "max_memory (its 'cpu' or 'disk' entries)")


@dataclass(frozen=True)
class Placement:
    """One parameter of a single-process load (a device map, translated): the checkpoint
    `key` that fills it, its `unit` (a module name; "" for the root's own parameters), the
    `dtype` it is materialized in, its `tier`, and the `device` a device-tier parameter
    lives on ("cuda:1", "cpu"; "" the load's device)."""

    param: str
    key: str
    unit: str
    dtype: str
    tier: str = Tier.DEVICE
    device: str = ""


def single_process_plan(units: Sequence[tuple[str, float]], placements: Sequence[Placement],
                        tensors: Mapping[str, TensorMeta], *, source: dict, format: str,
                        file_sizes: Mapping[str, int], stream_slots: int = 2,
                        config: Mapping | None = None, buffers: Sequence[str] = (),
                        pinned: bool = False) -> LoadPlan:
    """The world-of-one `LoadPlan` that runs a device map through `distload.loader`: one
    stage holding every unit (`units`: (name, per-token cost) in execution order), each
    parameter where its `Placement` says; `tensors` (relative files) are the checkpoint's.
    A key shared by several parameters (tied) is read once and lives on the most resident
    of their tiers. `stream_slots`: offloaded units held on the device at once.
    `buffers`: the checkpoint keys of the persistent buffers the caller fills beside the
    parameters (`StagePlan.buffers`: their files are fetched and checked with the rest).
    `pinned`: the offloaded units run on a GPU, so the disk tier streams through pinned
    host staging, ``stream_slots x`` the largest unit's disk bytes (the streamer's, reused),
    held beside the CPU tier: ``reserve["host_staging"]``, as `distload.plan.planner`
    records it for a GPU rank.

    Example::

        plan = single_process_plan([("linear", 32.0)],
                                   [Placement("linear.weight", "linear.weight", "linear", "float32")],
                                   tensors, source={"kind": "local", "label": "ckpt"},
                                   format="safetensors", file_sizes=sizes)
    """
    home: dict[str, str] = {}
    for p in placements:
        home[p.key] = Tier.most_resident((home.get(p.key, p.tier), p.tier))
    unit_tier: dict[str, str] = {}
    unit_bytes: dict[str, int] = {name: 0 for name, _ in units}
    unit_disk: dict[str, int] = {name: 0 for name, _ in units}   # bytes a unit streams from disk
    counted: set[tuple[str, str]] = set()
    for p in placements:
        unit_tier[p.unit] = Tier.most_resident((unit_tier.get(p.unit, home[p.key]), home[p.key]))
        if (p.unit, p.key) not in counted:
            counted.add((p.unit, p.key))
            nbytes = tensors[p.key].numel * dtype_from_name(p.dtype).itemsize
            unit_bytes[p.unit] += nbytes
            if home[p.key] == Tier.DISK:
                unit_disk[p.unit] += nbytes
    params = tuple(ParamSource(p.param, p.key, 0, p.dtype, home[p.key],
                               p.device if home[p.key] == Tier.DEVICE else "") for p in placements)
    first = {}
    for p in placements:
        first.setdefault(p.key, p)
    reads = tuple(sorted((tensors[k] for k in first), key=lambda m: (m.file, m.offset, m.name)))
    held = {t: 0 for t in Tier.ALL}
    for k, p in first.items():
        held[home[k]] += tensors[k].numel * dtype_from_name(p.dtype).itemsize
    slots = stream_slots if held[Tier.CPU] or held[Tier.DISK] else 0
    staging = slots * max(unit_disk.values(), default=0) if pinned else 0
    names = tuple(name for name, _ in units)
    stage = StagePlan(
        rank=0, units=names, unit_tiers=tuple(unit_tier.get(n, Tier.DEVICE) for n in names),
        params=params, reads=reads, sends=(), tensor_bytes=sum(m.length for m in reads),
        param_bytes=sum(held.values()), cost=float(sum(c for _, c in units)), held_bytes=held,
        stream_slots=slots, bound="a device map, in one process",
        reserve={"host_staging": staging} if staging else {},
        buffers=tuple(sorted((tensors[k] for k in set(buffers)), key=lambda m: (m.file, m.offset, m.name))))
    return LoadPlan(source=dict(source), format=format, config=dict(config or {}), dtype=None,
                    world_size=1, stages=(stage,), checkpoint_bytes=sum(m.length for m in tensors.values()),
                    unit_bytes=unit_bytes, no_split_units=names,
                    file_sizes=dict(sorted(file_sizes.items())))
