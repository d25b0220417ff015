"""The planner: contiguous pipeline stages that minimise the slowest stage, under each
rank's memory budgets, with what does not fit a rank's device on its CPU then disk tier.

Pure: the inputs are numbers (units' costs and sizes, `RankBudget`s), the output frozen
data. No torch.distributed, no files.

The model of one stage (units ``lo..hi-1`` on one rank):

* It keeps ``reserve = sum(KV caches) + max(working set)`` free on the device.
* If its weights fit beside the reserve, all of them go on the device.
* Otherwise it also keeps ``stream_slots x`` its largest unit free (offloaded units are
  streamed into the device to run, the next one prefetched), and the tiers are filled in
  execution order: the longest prefix that fits on the device, then the longest run that
  fits the rank's CPU tier, then the rest on its disk tier. Never another rank's device.
* Its cost is its per-token FLOPs plus a penalty per offloaded byte (streamed on every
  forward): ``cpu_penalty`` FLOP-equivalents per CPU-tier byte, ``disk_penalty`` per disk
  byte. A stage that does not fit at all costs infinity.
* A storage key shared by several units (tied embeddings) is held once per stage.

`partition` is exact for that model: a dynamic programme over (rank, boundary) finds the
contiguous split whose costliest stage is cheapest (O(ranks * units^2) stage evaluations,
each O(log units)); among those, a second pass takes the one with the smallest total
streaming penalty, then the most even costs (least sum of squares). Ties go the same way
on every run and hash seed. (Costs never fall as a stage grows, so both passes stop a
sweep early — except when units share a key, where that can fail and every split is tried.)

Example::

    units = [UnitLoad(f"l{i}", cost=1.0, items=((f"w{i}", 100),)) for i in range(4)]
    p = partition(units, [RankBudget(device=250), RankBudget(device=250)])
    p.bounds, p.tiers            # (0, 2, 4), ('device',) * 4
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..checkpoint.types import TensorMeta
from ..dtypes import cast_dtype, dtype_from_name
from ..errors import PlanError
from ..meta.describe import ModelSpec
from .budget import RankBudget, format_bytes
from .build import make_plan, match_params_to_keys
from .reserve import RunShape, UnitReserve, unit_reserves
from .types import LoadPlan, Tier

__all__ = ["UnitLoad", "PlannerOptions", "StageLayout", "Partition", "partition", "stage_layout",
           "unit_loads", "plan_model"]

INF = math.inf


@dataclass(frozen=True)
class UnitLoad:
    """One unit as the planner sees it: per-token cost, the storage it holds as (key,
    bytes) pairs, and what it reserves on the device while running (see `reserve.py`)."""

    name: str
    cost: float
    items: tuple[tuple[str, int], ...] = ()
    kv_bytes: int = 0
    work_bytes: int = 0


@dataclass(frozen=True)
class PlannerOptions:
    """Weights of the cost model; see the module docstring."""

    cpu_penalty: float = 64.0      # an H100 streams ~25 GB/s from pinned host memory
    disk_penalty: float = 1024.0   # and ~1.5 GB/s from one NVMe drive
    stream_slots: int = 2          # units resident while streaming: running + prefetched


@dataclass(frozen=True)
class StageLayout:
    lo: int
    hi: int
    tiers: tuple[str, ...]                 # one Tier per unit lo..hi-1
    tier_bytes: tuple[int, int, int]       # bytes on (device, cpu, disk), shared keys once
    compute: float                         # per-token FLOPs
    cost: float                            # compute + streaming penalty; INF if it cannot fit
    reserved: int                          # device bytes kept free to run


@dataclass(frozen=True)
class Partition:
    bounds: tuple[int, ...]                # len(ranks) + 1 stage boundaries over the units
    stages: tuple[StageLayout, ...]
    bottleneck: float                      # the costliest stage's cost
    reasons: tuple[str, ...]               # why each stage ends where it does, for --explain

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(t for s in self.stages for t in s.tiers)


class _Model:
    """Prefix sums over the units, so any stage is evaluated in O(log n)."""

    def __init__(self, units: Sequence[UnitLoad], options: PlannerOptions) -> None:
        self.units, self.opt, self.n = units, options, len(units)
        self.pc, self.pk, self.pb = [0.0], [0], [0]
        self.own: list[int] = []
        holders: dict[str, list[int]] = {}
        size: dict[str, int] = {}
        for i, u in enumerate(units):
            keys = {}
            for key, nbytes in u.items:
                keys.setdefault(key, int(nbytes))
                size.setdefault(key, int(nbytes))
            for key in keys:
                holders.setdefault(key, []).append(i)
            self.own.append(sum(keys.values()))
            self.pc.append(self.pc[-1] + float(u.cost))
            self.pk.append(self.pk[-1] + int(u.kv_bytes))
            self.pb.append(self.pb[-1] + self.own[-1])
        # keys held by several units: (bytes, sorted unit positions), in a fixed order
        self.shared = [(size[k], pos) for k, pos in sorted(holders.items()) if len(pos) > 1]
        self.table = [self.own[:]]
        while (2 << (len(self.table) - 1)) <= self.n:
            prev, half = self.table[-1], 1 << (len(self.table) - 1)
            self.table.append([max(prev[x], prev[x + half]) for x in range(len(prev) - half)])

    def nbytes(self, a: int, b: int) -> int:
        """Bytes units a..b-1 hold together (a shared key once)."""
        total = self.pb[b] - self.pb[a]
        for size, pos in self.shared:
            count = bisect_left(pos, b) - bisect_left(pos, a)
            if count > 1:
                total -= (count - 1) * size
        return total

    def _reach(self, lo: int, hi: int, base: int, limit: int) -> int:
        """The largest k in [lo, hi] with nbytes(base, k) <= limit (nbytes is monotone)."""
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.nbytes(base, mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def biggest(self, a: int, b: int) -> int:
        """The largest unit's own bytes among units a..b-1 (0 if none): a sparse table."""
        if a >= b:
            return 0
        level = (b - a).bit_length() - 1
        row = self.table[level]
        return max(row[a], row[b - (1 << level)])

    def split(self, j: int, i: int, work: int, b: RankBudget):
        """(cost, device end, cpu end, reserved) of stage j..i-1 on a rank with budget b."""
        compute = self.pc[i] - self.pc[j]
        kv = self.pk[i] - self.pk[j]
        total = self.nbytes(j, i)
        if total + kv + work <= b.device:
            return compute, i, i, kv + work
        # Units j..k-1 stay on the device; k..i-1 are streamed, so the device also keeps
        # room for `stream_slots` of the largest of those. Start from the whole stage's
        # largest unit and raise k while that frees room: the least consistent k.
        k, streamed = j - 1, self.biggest(j, i)
        while True:
            reserved = kv + work + self.opt.stream_slots * streamed
            cap = b.device - reserved
            if cap < 0:
                return INF, j, j, reserved
            k_next = self._reach(j, i, j, cap)
            if k_next == k:
                break
            k, streamed = k_next, self.biggest(k_next, i)
        on_device = self.nbytes(j, k)
        m = self._reach(k, i, j, on_device + b.cpu)
        on_cpu = self.nbytes(j, m) - on_device
        on_disk = total - on_device - on_cpu
        if b.disk is not None and on_disk > b.disk:
            return INF, k, m, reserved
        return compute + self.opt.cpu_penalty * on_cpu + self.opt.disk_penalty * on_disk, k, m, reserved

    def layout(self, j: int, i: int, b: RankBudget) -> StageLayout:
        work = max((self.units[x].work_bytes for x in range(j, i)), default=0)
        cost, k, m, reserved = self.split(j, i, work, b)
        tiers = (Tier.DEVICE,) * (k - j) + (Tier.CPU,) * (m - k) + (Tier.DISK,) * (i - m)
        dev = self.nbytes(j, k)
        cpu = self.nbytes(j, m) - dev
        return StageLayout(j, i, tiers, (dev, cpu, self.nbytes(j, i) - dev - cpu),
                           self.pc[i] - self.pc[j], cost, reserved)


def stage_layout(units: Sequence[UnitLoad], lo: int, hi: int, budget: RankBudget,
                 options: PlannerOptions | None = None) -> StageLayout:
    """How units lo..hi-1 would sit on a rank with `budget`: tiers, bytes, cost.

    Example::

        stage_layout(units, 0, 3, RankBudget(device=10**9, cpu=10**10)).cost
    """
    return _Model(units, options or PlannerOptions()).layout(lo, hi, budget)


def _sweep(model: _Model, budget: RankBudget, r: int, i: int, monotone: bool, limit: float):
    """Yield (j, cost) for stage j..i-1 of rank r, j from i-1 down to r. With `monotone`
    costs never fall as j falls, so the sweep stops at the first cost above `limit`."""
    work = 0
    for j in range(i - 1, r - 1, -1):
        work = max(work, model.units[j].work_bytes)
        cost = model.split(j, i, work, budget)[0]
        if monotone and cost > limit:
            return
        yield j, cost


def partition(units: Sequence[UnitLoad], budgets: Sequence[RankBudget],
              options: PlannerOptions | None = None) -> Partition:
    """Split `units` (in execution order) into one non-empty contiguous stage per rank,
    minimising the costliest stage under `budgets` (see the module docstring).

    Raises `PlanError` saying why when no split fits.

    Example::

        p = partition(loads, [RankBudget(device=80 << 30, cpu=200 << 30)] * 4)
        p.bounds, p.bottleneck, p.reasons
    """
    opt = options or PlannerOptions()
    n, world = len(units), len(budgets)
    if world < 1:
        raise PlanError("the world has no ranks")
    if world > n:
        raise PlanError(f"the model has {n} units but the world has {world} ranks; use at most {n} processes")
    model = _Model(units, opt)
    monotone = not model.shared  # a key shared across units can make costs non-monotone

    # Pass 1: the smallest bottleneck. best[r][i]: units 0..i-1 on ranks 0..r-1.
    best = [[INF] * (n + 1) for _ in range(world + 1)]
    best[0][0] = 0.0
    for r in range(world):
        for i in range(r + 1, n - (world - 1 - r) + 1):
            for j, cost in _sweep(model, budgets[r], r, i, monotone, INF):
                if monotone and cost >= best[r + 1][i]:
                    break
                value = max(best[r][j], cost)
                if value < best[r + 1][i]:
                    best[r + 1][i] = value
    bottleneck = best[world][n]
    if bottleneck == INF:
        raise PlanError(_diagnose(model, budgets))

    # Pass 2: among splits with every stage <= bottleneck, fewest streamed bytes-penalty,
    # then the smallest sum of squared costs (the most even stages).
    key = [[(INF, INF)] * (n + 1) for _ in range(world + 1)]
    cut = [[-1] * (n + 1) for _ in range(world + 1)]
    key[0][0] = (0.0, 0.0)
    for r in range(world):
        for i in range(r + 1, n - (world - 1 - r) + 1):
            for j, cost in _sweep(model, budgets[r], r, i, monotone, bottleneck):
                prev = key[r][j]
                if cost > bottleneck or prev[0] == INF:
                    continue
                penalty = cost - (model.pc[i] - model.pc[j])
                value = (prev[0] + penalty, prev[1] + cost * cost)
                if value < key[r + 1][i]:
                    key[r + 1][i], cut[r + 1][i] = value, j
    bounds = [n]
    for r in range(world, 0, -1):
        bounds.append(cut[r][bounds[-1]])
    bounds.reverse()
    stages = tuple(model.layout(bounds[r], bounds[r + 1], budgets[r]) for r in range(world))
    reasons = tuple(_reason(model, s, budgets[r], bottleneck, r == world - 1) for r, s in enumerate(stages))
    return Partition(tuple(bounds), stages, bottleneck, reasons)


def _reason(model: _Model, s: StageLayout, b: RankBudget, bottleneck: float, last: bool) -> str:
    dev, cpu, disk = s.tier_bytes
    if cpu or disk:
        moved = ", ".join(f"{s.tiers.count(t)} unit(s) ({format_bytes(x)}) to {t}"
                          for t, x in ((Tier.CPU, cpu), (Tier.DISK, disk)) if x)
        return (f"device budget {format_bytes(b.device)} full ({format_bytes(dev)} weights + "
                f"{format_bytes(s.reserved)} reserved): {moved}")
    if s.cost == bottleneck:
        return "slowest stage: its cost sets the pipeline's pace"
    if not last:
        grown = model.layout(s.lo, s.hi + 1, b)
        if grown.tier_bytes[1] or grown.tier_bytes[2] or grown.cost == INF:
            return (f"device budget: {format_bytes(dev)} + {format_bytes(s.reserved)} reserved of "
                    f"{format_bytes(b.device)}; the next unit would not fit")
    return "balanced: cheaper than the slowest stage"


def _diagnose(model: _Model, budgets: Sequence[RankBudget]) -> str:
    total = model.nbytes(0, model.n)
    biggest_device = max(b.device for b in budgets)
    for i, u in enumerate(model.units):
        need = u.kv_bytes + u.work_bytes + model.opt.stream_slots * model.own[i]
        if need > biggest_device and model.own[i] + u.kv_bytes + u.work_bytes > biggest_device:
            return (f"unit {u.name} needs {format_bytes(need)} on a device to run (weights "
                    f"{format_bytes(model.own[i])} x {model.opt.stream_slots} for streaming, plus "
                    f"KV cache and activations) but the largest device budget is "
                    f"{format_bytes(biggest_device)}: raise max_memory, or lower --max-batch-size "
                    "/ --max-seq-len")
    devices = sum(b.device for b in budgets)
    if total > devices:
        streamed = max(model.own) * model.opt.stream_slots
        return (f"the weights ({format_bytes(total)}) exceed the device budgets "
                f"({format_bytes(devices)} in all), so units must be streamed from the cpu or "
                f"disk tier, which needs {model.opt.stream_slots} x the largest unit "
                f"({format_bytes(streamed)}) free on a device beside its KV cache and "
                "activations: raise the device budgets (max_memory[rank], or 'cpu' without "
                "GPUs), use more ranks, or lower --max-batch-size / --max-seq-len")
    if any(b.disk is None for b in budgets):
        capacity = "unlimited"
    else:
        capacity = format_bytes(sum(b.device + b.cpu + (b.disk or 0) for b in budgets))
    return (f"no contiguous split of {model.n} units ({format_bytes(total)} of weights, plus "
            f"reserves) fits {len(budgets)} rank(s) whose device + cpu + disk budgets total "
            f"{capacity}: raise max_memory (its 'cpu' or 'disk' entries), or use more ranks; "
            "budgets: " + "; ".join(f"rank {r}: device {format_bytes(b.device)}, cpu "
                                    f"{format_bytes(b.cpu)}, disk {format_bytes(b.disk)}"
                                    for r, b in enumerate(budgets)))


# --------------------------------------------------------------------------- glue

def unit_loads(spec: ModelSpec, param_bytes: Mapping[str, int], *,
               key_of: Mapping[str, str] | None = None,
               reserves: Sequence[UnitReserve] | None = None) -> tuple[UnitLoad, ...]:
    """The planner's view of `spec`: each unit's cost, its parameters' storage (`key_of`
    maps a parameter to its storage key — default: a tied group's first name, so a tied
    tensor is one key) and its reserve.

    Example::

        loads = unit_loads(spec, {p.name: p.numel * 2 for u in spec.units for p in u.params})
    """
    if key_of is None:
        key_of = {name: group[0] for group in spec.tied for name in group}
    reserves = reserves or [UnitReserve()] * len(spec.units)
    return tuple(
        UnitLoad(u.name, u.cost, tuple((key_of.get(p.name, p.name), int(param_bytes[p.name])) for p in u.params),
                 r.kv_bytes, r.work_bytes)
        for u, r in zip(spec.units, reserves))


def plan_model(spec: ModelSpec, tensors: Mapping[str, TensorMeta], *, budgets: Sequence[RankBudget],
               source: dict, format: str, config: dict, dtype: str | None = None,
               strict: bool = True, shape: RunShape | None = None,
               options: PlannerOptions | None = None, file_sizes: Mapping[str, int] | None = None,
               activation_dtype: str | None = None) -> LoadPlan:
    """The `LoadPlan` for one rank per budget: the partition above, then `make_plan` for
    what each rank reads and sends. Pure (rank 0 calls it; see `distload.loader.prepare`).

    Example::

        plan = plan_model(spec, index.tensors, budgets=resolve_budgets({}, measured),
                          source={"kind": "local", "label": "llama"}, format="safetensors",
                          config=cfg, shape=RunShape(1, 2048))
    """
    param_to_key, _ = match_params_to_keys(spec, tensors, strict=strict)
    nbytes = {p: tensors[k].numel * dtype_from_name(cast_dtype(tensors[k].dtype, dtype)).itemsize
              for p, k in param_to_key.items()}
    floats = [m for m in tensors.values() if dtype_from_name(m.dtype).is_floating_point]
    itemsize = dtype_from_name(dtype).itemsize if dtype else (
        max(floats, key=lambda m: (m.length, m.name)).torch_dtype.itemsize if floats else 2)
    reserves = unit_reserves(spec, shape, itemsize=itemsize, config=config)
    p = partition(unit_loads(spec, nbytes, key_of=param_to_key, reserves=reserves), budgets, options)
    plan = make_plan(spec, tensors, world_size=len(budgets), source=source, format=format,
                     config=config, dtype=dtype, strict=strict, bounds=p.bounds, unit_tiers=p.tiers,
                     reserved_bytes=[s.reserved for s in p.stages], bound_reasons=p.reasons,
                     file_sizes=file_sizes, activation_dtype=activation_dtype)
    stages = tuple(replace(st, budget=budgets[r].as_dict(), plan_cost=p.stages[r].cost,
                           held_bytes=dict(zip(Tier.ALL, p.stages[r].tier_bytes)))
                   for r, st in enumerate(plan.stages))
    run = {"max_batch_size": shape.max_batch_size, "max_seq_len": shape.max_seq_len} if shape else {}
    return replace(plan, stages=stages, no_split_classes=tuple(spec.no_split_classes), run_shape=run)
