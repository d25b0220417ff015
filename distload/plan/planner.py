"""The planner: contiguous pipeline stages that minimise the slowest stage, under each
rank's memory budgets, with what does not fit a rank's device streamed from its CPU then
disk tier.

Pure: the inputs are numbers (units' costs and sizes, `RankBudget`s), the output frozen
data. No torch.distributed, no files.

The model of one stage — which units stay on the device (any subset: a large embedding
may stay while small layers stream), one or two streaming slots, CPU then disk for the
rest, and its cost (FLOPs plus a penalty per streamed byte) — is `distload.plan.stage`.
Never another rank's device.

`partition` is exact for that model: a dynamic programme over (rank, boundary) finds the
contiguous split whose costliest stage is cheapest (O(ranks * units^2) stage solutions,
cached); among those, a second pass takes the one with the smallest total streaming
penalty, then — when units name their checkpoint files (`UnitLoad.files`) — the fewest
files touched summed over the stages (less to download per node), then the most even
costs (least sum of squares). Ties go the same way on every run and hash seed. (Costs
never fall as a stage grows, so both passes stop a sweep early — except when units share
a key, where that can fail and every split is tried.) A unit marked `with_previous` (the
model's `joined_units`: a layer reading another layer's KV cache) never starts a stage.

Example::

    units = [UnitLoad(f"l{i}", cost=1.0, items=((f"w{i}", 100),)) for i in range(4)]
    p = partition(units, [RankBudget(device=250), RankBudget(device=250)])
    p.bounds, p.tiers            # (0, 2, 4), ('device',) * 4
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..checkpoint.quant import Encoded
from ..checkpoint.types import TensorMeta
from ..checkpoint.dtypes import dtype_from_name
from ..errors import PlanError
from ..meta.describe import ModelSpec
from .budget import RankBudget, format_bytes
from .build import key_dtypes, make_plan, match_params_to_keys
from .reserve import RunShape, UnitReserve, unit_reserves
from .stage import INF, PlannerOptions, StageLayout, StageModel, UnitLoad
from .types import LoadPlan, Tier

__all__ = ["UnitLoad", "PlannerOptions", "StageLayout", "Partition", "partition", "stage_layout",
           "unit_loads", "plan_model"]


@dataclass(frozen=True)
class Partition:
    bounds: tuple[int, ...]                # len(ranks) + 1 stage boundaries over the units
    stages: tuple[StageLayout, ...]
    bottleneck: float                      # the costliest stage's cost
    reasons: tuple[str, ...]               # why each stage ends where it does, for --explain

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(t for s in self.stages for t in s.tiers)


def stage_layout(units: Sequence[UnitLoad], lo: int, hi: int, budget: RankBudget,
                 options: PlannerOptions | None = None) -> StageLayout:
    """How units lo..hi-1 would sit on a rank with `budget`: tiers, bytes, slots, cost.

    Example::

        stage_layout(units, 0, 3, RankBudget(device=10**9, cpu=10**10)).cost
    """
    return StageModel(units, options).layout(lo, hi, budget)


def best_splits(model: StageModel, budgets: Sequence[RankBudget], *,
                every_end: bool = False) -> list[list[float]]:
    """Pass 1: ``best[r][i]``, the smallest bottleneck of units 0..i-1 on ranks 0..r-1
    (every stage non-empty) — for every i with `every_end`, else only where the later
    ranks can still get a unit each."""
    n, world = model.n, len(budgets)
    monotone = not model.shared  # a key shared across units can make costs non-monotone
    best = [[INF] * (n + 1) for _ in range(world + 1)]
    best[0][0] = 0.0
    for r in range(world):
        for i in range(r + 1, n + 1 - (0 if every_end else world - 1 - r)):
            for j in range(i - 1, r - 1, -1):
                if best[r][j] == INF or _joined(model, j):
                    continue
                cost = model.cost(j, i, budgets[r], best[r + 1][i])
                if cost >= best[r + 1][i]:
                    if monotone:
                        break
                    continue
                best[r + 1][i] = max(best[r][j], cost)
    return best


def choose_bounds(model: StageModel, budgets: Sequence[RankBudget], bottleneck: float,
                  end: int | None = None) -> tuple[int, ...]:
    """Pass 2: the bounds of units 0..end-1 on every rank of `budgets` with every stage at
    most `bottleneck`: least streaming penalty, then fewest files, then most even."""
    n = model.n if end is None else end
    world = len(budgets)
    monotone = not model.shared
    files = [frozenset(u.files) for u in model.units]
    key: list[list[tuple]] = [[(INF, INF, INF)] * (n + 1) for _ in range(world + 1)]
    cut = [[-1] * (n + 1) for _ in range(world + 1)]
    key[0][0] = (0.0, 0, 0.0)
    for r in range(world):
        for i in range(r + 1, n + 1):
            touched: set = set()
            for j in range(i - 1, r - 1, -1):
                touched |= files[j]
                if _joined(model, j):   # no stage may start at this unit
                    continue
                cost = model.cost(j, i, budgets[r], bottleneck)
                if cost > bottleneck:
                    if monotone:
                        break
                    continue
                prev = key[r][j]
                if prev[0] == INF:
                    continue
                value = (prev[0] + (cost - model.compute(j, i)), prev[1] + len(touched),
                         prev[2] + cost * cost)
                if value < key[r + 1][i]:
                    key[r + 1][i], cut[r + 1][i] = value, j
    bounds = [n]
    for r in range(world, 0, -1):
        bounds.append(cut[r][bounds[-1]])
    bounds.reverse()
    return tuple(bounds)


def partition(units: Sequence[UnitLoad], budgets: Sequence[RankBudget],
              options: PlannerOptions | None = None) -> Partition:
    """Split `units` (in execution order) into one non-empty contiguous stage per rank,
    minimising the costliest stage under `budgets` (see the module docstring).

    Raises `PlanError` saying why when no split fits.

    Example::

        p = partition(loads, [RankBudget(device=80 << 30, cpu=200 << 30)] * 4)
        p.bounds, p.bottleneck, p.reasons, [s.stream_slots for s in p.stages]
    """
    n, world = len(units), len(budgets)
    if world < 1:
        raise PlanError("the world has no ranks")
    if world > n:
        raise PlanError(f"the model has {n} units but the world has {world} ranks; use at most {n} processes")
    starts = [i for i in range(n) if not units[i].with_previous or i == 0]
    if world > len(starts):
        together = [u.name for u in units if u.with_previous]
        raise PlanError(f"the model splits into at most {len(starts)} stages ({len(together)} of its {n} units, "
                        f"from {together[0]}, stay on the stage of the unit before them) but the world "
                        f"has {world} ranks; use at most {len(starts)} processes")
    model = StageModel(units, options)
    bottleneck = best_splits(model, budgets)[world][n]
    if bottleneck == INF:
        raise PlanError(_diagnose(model, budgets))
    bounds = choose_bounds(model, budgets, bottleneck)
    return finish(model, budgets, bounds, bottleneck)


def _joined(model: StageModel, j: int) -> bool:
    """Whether unit j must stay on the stage of unit j - 1 (no stage may start at it)."""
    return j > 0 and model.units[j].with_previous


def finish(model: StageModel, budgets: Sequence[RankBudget], bounds: Sequence[int],
           bottleneck: float) -> Partition:
    """The `Partition` of `bounds`: each stage's layout and the reason it ends there."""
    world = len(budgets)
    stages = tuple(model.layout(bounds[r], bounds[r + 1], budgets[r]) for r in range(world))
    reasons = tuple(_reason(model, s, budgets[r], bottleneck, r == world - 1) for r, s in enumerate(stages))
    return Partition(tuple(bounds), stages, bottleneck, reasons)


def _reason(model: StageModel, s: StageLayout, b: RankBudget, bottleneck: float, last: bool) -> str:
    dev, cpu, disk = s.tier_bytes
    if cpu or disk:
        moved = ", ".join(f"{s.tiers.count(t)} unit(s) ({format_bytes(x)}) to {t}"
                          for t, x in ((Tier.CPU, cpu), (Tier.DISK, disk)) if x)
        slots = "2 streaming slots (prefetch)" if s.stream_slots == 2 else "1 streaming slot (no prefetch)"
        if s.stream_slots == 1 and model.opt.stream_slots == 2:
            prefetching = StageModel(model.units, replace(model.opt, no_prefetch_factor=1e30))
            slots = slots[:-1] + (": keeping more units resident costs less)"
                                  if prefetching.layout(s.lo, s.hi, b).stream_slots == 2
                                  else ": two do not fit)")
        return (f"device budget {format_bytes(b.device)} full ({format_bytes(dev)} weights + "
                f"{format_bytes(s.reserved)} reserved): {moved}; {slots} of "
                f"{format_bytes(s.stream_bytes)}")
    if s.cost == bottleneck:
        return "slowest stage: its cost sets the pipeline's pace"
    if not last and s.hi < model.n:
        grown = model.layout(s.lo, s.hi + 1, b)
        if grown.tier_bytes[1] or grown.tier_bytes[2] or grown.cost == INF:
            return (f"device budget: {format_bytes(dev)} + {format_bytes(s.reserved)} reserved of "
                    f"{format_bytes(b.device)}; the next unit would not fit")
    return "balanced: cheaper than the slowest stage"


def _diagnose(model: StageModel, budgets: Sequence[RankBudget]) -> str:
    total = model.nbytes(0, model.n)
    biggest_device = max(b.device for b in budgets)
    for i, u in enumerate(model.units):
        need = u.kv_bytes + u.work_bytes + model.own[i]
        if need > biggest_device:
            return (f"unit {u.name} needs {format_bytes(need)} on a device to run (weights "
                    f"{format_bytes(model.own[i])}, resident or streamed into one slot, plus "
                    f"KV cache and activations) but the largest device budget is "
                    f"{format_bytes(biggest_device)}: raise max_memory=, or lower max_batch_size= "
                    "/ max_seq_len=")
    devices = sum(b.device for b in budgets)
    if total > devices and all(b.cpu == 0 and b.disk == 0 for b in budgets):
        return (f"the weights ({format_bytes(total)}) exceed the device budgets "
                f"({format_bytes(devices)} in all) and there is no cpu or disk tier to stream "
                "from: raise the device budgets, give max_memory a 'cpu' or 'disk' entry, or "
                "use more ranks")
    if any(b.disk is None for b in budgets):
        capacity = "unlimited"
    else:
        capacity = format_bytes(sum(b.device + b.cpu + (b.disk or 0) for b in budgets))
    return (f"no contiguous split of {model.n} units ({format_bytes(total)} of weights, plus "
            f"reserves) fits {len(budgets)} rank(s) whose device + cpu + disk budgets total "
            f"{capacity} (a streamed unit also needs room for itself on the device beside "
            "the KV cache and activations; on a GPU, streaming from disk also needs slots x "
            "the largest streamed unit of pinned staging within the cpu budget): raise "
            "max_memory, or use more ranks; "
            "budgets: " + "; ".join(f"rank {r}: device {format_bytes(b.device)}, cpu "
                                    f"{format_bytes(b.cpu)}, disk {format_bytes(b.disk)}"
                                    for r, b in enumerate(budgets)))


# --------------------------------------------------------------------------- glue

def unit_loads(spec: ModelSpec, param_bytes: Mapping[str, int], *,
               key_of: Mapping[str, str] | None = None,
               reserves: Sequence[UnitReserve] | None = None,
               files: Mapping[str, str] | None = None) -> tuple[UnitLoad, ...]:
    """The planner's view of `spec`: each unit's cost, its parameters' storage (`key_of`
    maps a parameter to its storage key — default: a tied group's first name, so a tied
    tensor is one key), its reserve, and — given `files` (storage key -> checkpoint file)
    — the files its tensors live in.

    Example::

        loads = unit_loads(spec, {p.name: p.numel * 2 for u in spec.units for p in u.params})
    """
    if key_of is None:
        key_of = {name: group[0] for group in spec.tied for name in group}
    reserves = reserves or [UnitReserve()] * len(spec.units)
    files = files or {}
    joined = set(spec.joined)
    out = []
    for u, r in zip(spec.units, reserves):
        keys = [key_of.get(p.name, p.name) for p in u.params]
        out.append(UnitLoad(u.name, u.cost, tuple((k, int(param_bytes[p.name])) for k, p in zip(keys, u.params)),
                            r.kv_bytes, r.work_bytes, tuple(sorted({files[k] for k in keys if k in files})),
                            u.name in joined))
    return tuple(out)


def plan_model(spec: ModelSpec, tensors: Mapping[str, TensorMeta], *, budgets: Sequence[RankBudget],
               source: dict, format: str, config: dict, dtype: str | None = None,
               strict: bool = True, shape: RunShape | None = None,
               options: PlannerOptions | None = None, file_sizes: Mapping[str, int] | None = None,
               activation_dtype: str | None = None, shard_aware: bool = False,
               encoded: Mapping[str, Encoded] | None = None, keep_float32: Sequence[str] = ()) -> LoadPlan:
    """The `LoadPlan` for one rank per budget: the partition above, then `make_plan` for
    what each rank reads and sends. Pure (rank 0 calls it; see `distload.loader.prepare`).
    `shard_aware`: among equally good splits, prefer the one whose stages touch the fewest
    checkpoint files (when each node downloads the files its ranks read). `encoded`: the
    keys decoded from a quantized checkpoint (`make_plan`); stages are sized by their
    decoded bytes, reads are the quantized ones. `keep_float32`: regexes of parameter names
    held in float32 whatever `dtype` (`make_plan`).

    Example::

        plan = plan_model(spec, index.tensors, budgets=resolve_budgets({}, measured),
                          source={"kind": "local", "label": "llama"}, format="safetensors",
                          config=cfg, shape=RunShape(1, 2048))
    """
    param_to_key, _ = match_params_to_keys(spec, tensors, strict=strict)
    dtypes = key_dtypes(param_to_key, tensors, dtype, keep_float32)
    nbytes = {p: tensors[k].numel * dtype_from_name(dtypes[k]).itemsize for p, k in param_to_key.items()}
    floats = [m for m in tensors.values() if dtype_from_name(m.dtype).is_floating_point]
    itemsize = dtype_from_name(dtype).itemsize if dtype else (
        max(floats, key=lambda m: (m.length, m.name)).torch_dtype.itemsize if floats else 2)
    reserves = unit_reserves(spec, shape, itemsize=itemsize, config=config)
    files = {k: tensors[k].file for k in param_to_key.values()} if shard_aware else None
    p = partition(unit_loads(spec, nbytes, key_of=param_to_key, reserves=reserves, files=files),
                  budgets, options)
    plan = make_plan(spec, tensors, world_size=len(budgets), source=source, format=format,
                     config=config, dtype=dtype, strict=strict, bounds=p.bounds, unit_tiers=p.tiers,
                     reserved_bytes=[s.reserved for s in p.stages], bound_reasons=p.reasons,
                     file_sizes=file_sizes, activation_dtype=activation_dtype, encoded=encoded,
                     keep_float32=keep_float32)
    stages = tuple(replace(st, budget=budgets[r].as_dict(), plan_cost=lay.cost,
                           held_bytes=dict(zip(Tier.ALL, lay.tier_bytes)), stream_slots=lay.stream_slots,
                           reserve={"kv": lay.kv_bytes, "work": lay.work_bytes,
                                    "stream": lay.stream_slots * lay.stream_bytes,
                                    "host_staging": lay.staging_bytes})
                   for r, (st, lay) in enumerate(zip(plan.stages, p.stages)))
    run = shape.as_dict() if shape else {}
    return replace(plan, stages=stages, no_split_classes=tuple(spec.no_split_classes), run_shape=run)
