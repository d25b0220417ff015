"""The model of one pipeline stage: which of its units stay on the device, which are
streamed from the CPU or disk tier, with one or two streaming slots, and what that costs.

A stage is the units ``lo..hi-1`` on one rank with a `RankBudget` (device, cpu, disk):

* It keeps ``reserve = sum(KV caches) + max(working set)`` free on the device.
* If its weights fit beside the reserve, all of them stay on the device.
* Otherwise it chooses a set of units that stay on the device (*any* set, not a prefix:
  a large embedding may stay while the small layers stream) and a number of streaming
  slots ``s`` (2: the next unit is prefetched while one runs; 1: no prefetch). Every
  other unit is streamed: its storage not already on the device (a tied tensor another
  unit holds resident is not fetched) is its *fetch*; the device keeps room for ``s x``
  the largest fetch. So: ``resident + reserve + s * largest fetch <= device``.
* Streamed storage is placed in *pieces* (one streamed unit's fetch; pieces that share a
  tensor are one piece): the largest piece first, each on the CPU tier while it fits
  there, else on the disk tier (ties in execution order). The disk tier's budget must
  hold the rest. When anything goes to the disk tier of a GPU rank (``budget.pinned``),
  the streamer's reused pinned staging, ``s x`` the largest fetch (an upper bound of its
  ``s x`` largest disk unit), comes out of the CPU budget first: the host holds it beside
  the CPU tier. A CPU budget below the staging itself cannot stream from disk.
* The cost is the per-token FLOPs plus a penalty per streamed byte (fetched on every
  forward): ``cpu_penalty`` per CPU-tier byte, ``disk_penalty`` per disk byte, both times
  ``no_prefetch_factor`` with one slot (a fetch then no longer overlaps the previous
  unit's compute). The stage takes the choice of least cost; it costs infinity when none
  fits. A storage key shared by several units (tied embeddings) is held once per stage.

`StageModel.solve` finds that least cost exactly: units of equal size are interchangeable,
so it enumerates the bound on the largest fetch (one of the stage's sizes), the slots,
the resident subsets of each group of units tied to one another, and how many units of
each size stay resident — all but the most numerous size, for which "as many as fit" is
optimal (keeping one more unit resident never raises the cost: the greedy CPU fill of a
smaller set loses at most that unit's bytes). Real models have a few sizes (embedding,
layer, norm, head), so a stage is solved in tens of microseconds. A stage with more
combinations than `_MAX_COMBINATIONS` (dozens of distinct sizes) falls back to keeping
units resident largest first, and says so in the log once.

Example::

    units = [UnitLoad("emb", 0.0, (("e", 100),))] + [UnitLoad(f"l{i}", 1.0, ((f"l{i}", 10),))
                                                     for i in range(6)]
    s = StageModel(units).layout(0, 7, RankBudget(130, 0, None))
    s.tiers[0], s.stream_slots        # 'device' (the embedding stays), 2
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from ..log import logger
from .budget import RankBudget
from .types import Tier

__all__ = ["UnitLoad", "PlannerOptions", "StageLayout", "StageModel", "INF"]

INF = math.inf
_MAX_COMBINATIONS = 4096   # resident-count combinations tried per (slots, largest fetch)
_MAX_TIED_GROUP = 6        # members of one tied group whose resident subsets are enumerated


@dataclass(frozen=True)
class UnitLoad:
    """One unit as the planner sees it: per-token cost, the storage it holds as (key,
    bytes) pairs, what it reserves on the device while running (see `reserve.py`), and
    optionally the checkpoint files its tensors live in (a shard-aware tie-break), and
    whether it must run on the stage of the unit before it (`with_previous`: a layer that
    reads another layer's KV cache; no stage starts at such a unit)."""

    name: str
    cost: float
    items: tuple[tuple[str, int], ...] = ()
    kv_bytes: int = 0
    work_bytes: int = 0
    files: tuple[str, ...] = ()
    with_previous: bool = False   # must stay on the stage of the unit before it (no boundary)


@dataclass(frozen=True)
class PlannerOptions:
    """Weights of the cost model; see the module docstring."""

    cpu_penalty: float = 64.0      # an H100 streams ~25 GB/s from pinned host memory
    disk_penalty: float = 1024.0   # and ~1.5 GB/s from one NVMe drive
    stream_slots: int = 2          # the most units resident while streaming (2: prefetch)
    no_prefetch_factor: float = 1.25  # one slot: fetches stop overlapping compute


@dataclass(frozen=True)
class StageLayout:
    lo: int
    hi: int
    tiers: tuple[str, ...]                 # one Tier per unit lo..hi-1
    tier_bytes: tuple[int, int, int]       # bytes on (device, cpu, disk), shared keys once
    compute: float                         # per-token FLOPs
    cost: float                            # compute + streaming penalty; INF if it cannot fit
    reserved: int                          # device bytes kept free: kv + work + slots x fetch
    stream_slots: int = 0                  # 0: nothing streamed; 1: no prefetch; 2: prefetch
    stream_bytes: int = 0                  # the largest streamed unit's fetch
    kv_bytes: int = 0
    work_bytes: int = 0
    staging_bytes: int = 0                 # host: disk tier's pinned staging, slots x fetch

    @property
    def streamed(self) -> int:
        """Bytes fetched from the CPU and disk tiers per forward (a piece once)."""
        return self.tier_bytes[1] + self.tier_bytes[2]


@dataclass(frozen=True)
class _Choice:
    """The solver's argmin for one stage: enough to rebuild its layout."""

    cost: float
    slots: int
    groups: tuple[frozenset, ...]          # resident members of each tied group
    resident: tuple[tuple[int, int], ...]  # (size, count) of independent units kept resident


class StageModel:
    """Prefix sums and tied groups over the units, so any stage is solved quickly (see the
    module docstring). Pure; `solve` results are cached per (stage, budget)."""

    def __init__(self, units: Sequence[UnitLoad], options: PlannerOptions | None = None) -> None:
        self.units, self.opt, self.n = list(units), options or PlannerOptions(), len(units)
        if self.opt.stream_slots not in (1, 2):
            raise ValueError(f"stream_slots must be 1 or 2, not {self.opt.stream_slots}")
        self.keys: list[dict[str, int]] = []
        holders: dict[str, list[int]] = {}
        self.size: dict[str, int] = {}
        self.pc, self.pk, self.pb = [0.0], [0], [0]
        for i, u in enumerate(units):
            keys: dict[str, int] = {}
            for key, nbytes in u.items:
                keys.setdefault(key, int(nbytes))
                self.size.setdefault(key, int(nbytes))
            self.keys.append(keys)
            for key in keys:
                holders.setdefault(key, []).append(i)
            self.pc.append(self.pc[-1] + float(u.cost))
            self.pk.append(self.pk[-1] + int(u.kv_bytes))
            self.pb.append(self.pb[-1] + sum(keys.values()))
        self.own = [sum(k.values()) for k in self.keys]
        # keys held by several units: (key, bytes, sorted unit positions), in a fixed order
        self.shared = [(k, self.size[k], pos) for k, pos in sorted(holders.items()) if len(pos) > 1]
        self.tied_units = sorted({p for _, _, pos in self.shared for p in pos})
        self.sizes = sorted(set(self.own), reverse=True)
        self.count_prefix = {w: [0] for w in self.sizes}
        for w_own in self.own:
            for w, pref in self.count_prefix.items():
                pref.append(pref[-1] + (w_own == w))
        self._own_max = _SparseMax(self.own)
        self._work_max = _SparseMax([int(u.work_bytes) for u in units])
        self._cache: dict[tuple, _Choice] = {}
        self._warned = False

    # ------------------------------------------------------------------ plain facts
    def nbytes(self, a: int, b: int) -> int:
        """Bytes units a..b-1 hold together (a shared key once)."""
        total = self.pb[b] - self.pb[a]
        for _, size, pos in self.shared:
            count = bisect_left(pos, b) - bisect_left(pos, a)
            if count > 1:
                total -= (count - 1) * size
        return total

    def biggest(self, a: int, b: int) -> int:
        """The largest unit's own bytes among units a..b-1 (0 if none)."""
        return self._own_max.query(a, b)

    def compute(self, a: int, b: int) -> float:
        return self.pc[b] - self.pc[a]

    def reserve(self, a: int, b: int) -> tuple[int, int]:
        """(KV bytes, working-set bytes) a stage of units a..b-1 keeps on the device."""
        return self.pk[b] - self.pk[a], self._work_max.query(a, b)

    # ------------------------------------------------------------------ the solver
    def cost(self, a: int, b: int, budget: RankBudget, limit: float = INF) -> float:
        """The least cost of stage a..b-1 under `budget` (INF: it cannot fit). Above
        `limit` it may return any value above `limit` (a lower bound) instead."""
        return self._choice(a, b, budget, limit).cost

    def _choice(self, a: int, b: int, budget: RankBudget, limit: float = INF) -> _Choice:
        key = (a, b, budget.device, budget.cpu, budget.disk, budget.pinned)
        hit = self._cache.get(key)
        if hit is not None and (hit.slots >= 0 or hit.cost > limit):
            return hit
        choice = self._solve(a, b, budget, limit)
        self._cache[key] = choice
        return choice

    def _solve(self, a: int, b: int, bud: RankBudget, limit: float) -> _Choice:
        opt = self.opt
        compute = self.compute(a, b)
        kv, work = self.reserve(a, b)
        room = bud.device - kv - work
        total = self.nbytes(a, b)
        if total <= room:
            return _Choice(compute, 0, (), ())
        need = total - max(room, 0)               # bytes that must leave the device at least
        if bud.disk is not None and need > bud.cpu + bud.disk:
            return _Choice(INF, 0, (), ())
        bound = compute + opt.cpu_penalty * need
        if bound > limit:
            return _Choice(bound, -1, (), ())     # -1: a lower bound, not a solution
        groups, free = self._stage_groups(a, b)
        classes = [(w, c) for w, c in free.items() if c]
        classes.sort(reverse=True)
        best = _Choice(INF, 0, (), ())
        for slots in range(opt.stream_slots, 0, -1):
            factor = 1.0 if slots == 2 or opt.stream_slots == 1 else opt.no_prefetch_factor
            if compute + factor * opt.cpu_penalty * need >= best.cost:
                continue
            for config in itertools.product(*(g.configs for g in groups)):
                held = sum(c.resident for c in config)
                pieces = [p for c in config for p in c.pieces if p]
                fetch = max((c.fetch for c in config), default=0)
                for m in sorted({fetch} | {w for w, _ in classes if w > fetch}):
                    cap = room - held - slots * m - sum(w * c for w, c in classes if w > m)
                    if cap < 0:
                        continue
                    if compute + factor * opt.cpu_penalty * (need + slots * m) >= best.cost:
                        continue  # at least need + slots * m bytes stream: no better
                    small = [(w, c) for w, c in classes if w <= m]
                    for resident, cpu, disk in self._fills(small, cap, pieces, bud,
                                                           slots * m if bud.pinned else 0):
                        if bud.disk is not None and disk > bud.disk:
                            continue
                        cost = compute + factor * (opt.cpu_penalty * cpu + opt.disk_penalty * disk)
                        if cost < best.cost:
                            big = tuple((w, c) for w, c in classes if w > m)
                            best = _Choice(cost, slots, tuple(c.members for c in config),
                                           big + resident)
        return best

    def _fills(self, small, cap, pieces, bud, staging):
        """Yield (resident (size, count) pairs, cpu bytes, disk bytes) for every way of
        keeping units of `small` resident within `cap` (the most numerous size: as many as
        fit), the streamed rest plus `pieces` placed largest first on the CPU tier (less
        `staging` when the disk tier is used; disk bytes INF when even that cannot fit)."""
        if not small:
            yield (), *_place(pieces, (), bud.cpu, staging)
            return
        greedy = max(range(len(small)), key=lambda x: (small[x][1], small[x][0]))
        others = [small[x] for x in range(len(small)) if x != greedy]
        combos = math.prod(c + 1 for _, c in others)
        gw, gc = small[greedy]
        if combos > _MAX_COMBINATIONS:
            if not self._warned:
                self._warned = True
                logger.info("planner: %d unit sizes in one stage; keeping units resident "
                            "largest first there (not an exhaustive search)", len(small))
            counts, left = [], cap
            for w, c in small:
                k = c if w == 0 else min(c, left // w)
                counts.append((w, k))
                left -= w * k
            yield (tuple(counts), *_place(pieces, tuple((w, c - k) for (w, c), (_, k)
                                                        in zip(small, counts)), bud.cpu, staging))
            return
        for ks in itertools.product(*(range(c + 1) for _, c in others)):
            left = cap - sum(w * k for (w, _), k in zip(others, ks))
            if left < 0:
                continue
            kg = gc if gw == 0 else min(gc, left // gw)
            counts = tuple((w, k) for (w, _), k in zip(others, ks)) + ((gw, kg),)
            streamed = tuple((w, c - k) for (w, c), k in zip(others, ks)) + ((gw, gc - kg),)
            yield (counts, *_place(pieces, streamed, bud.cpu, staging))

    def _stage_groups(self, a: int, b: int):
        """The stage's tied groups (units joined by keys shared within a..b-1) and the
        other units' counts by size."""
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        for _, _, pos in self.shared:
            inside = pos[bisect_left(pos, a):bisect_left(pos, b)]
            for x in inside[1:]:
                parent[find(x)] = find(inside[0])
        free = {w: pref[b] - pref[a] for w, pref in self.count_prefix.items()}
        members: dict[int, list[int]] = {}
        for x in parent:
            members.setdefault(find(x), []).append(x)
        groups = []
        for root in sorted(members):
            units = sorted(members[root])
            for x in units:
                free[self.own[x]] -= 1
            groups.append(_TiedGroup(self, units))
        return groups, free

    # ------------------------------------------------------------------ the layout
    def layout(self, a: int, b: int, budget: RankBudget) -> StageLayout:
        """The stage's units on their tiers, as the least-cost choice places them."""
        choice = self._choice(a, b, budget)
        compute = self.compute(a, b)
        kv, work = self.reserve(a, b)
        units = range(a, b)
        if choice.cost == INF or choice.slots == 0:
            tiers = (Tier.DEVICE,) * (b - a)
            dev = self.nbytes(a, b)
            return StageLayout(a, b, tiers, (dev, 0, 0), compute, choice.cost, kv + work,
                               kv_bytes=kv, work_bytes=work)
        resident = set().union(*choice.groups) if choice.groups else set()
        grouped = {x for _, _, pos in self.shared for x in pos
                   if bisect_left(pos, a) + 1 < bisect_left(pos, b) and a <= x < b}
        keep = dict(choice.resident)
        for x in units:                      # equal sizes: the first ones stay resident
            if x not in grouped and keep.get(self.own[x], 0) > 0:
                keep[self.own[x]] -= 1
                resident.add(x)
        on_device = {k for x in resident for k in self.keys[x]}
        fetch = {x: {k for k in self.keys[x] if k not in on_device} for x in units if x not in resident}
        pieces = _merge_pieces(fetch)
        largest = max((sum(self.size[k] for k in f) for f in fetch.values()), default=0)
        ordered = sorted(((sum(self.size[k] for k in keys), sorted(m)) for m, keys in pieces),
                         key=lambda p: (-p[0], p[1][0]))

        def fill(room: int) -> tuple[dict, int, int]:
            tier, cpu, disk = {x: Tier.DEVICE for x in resident}, 0, 0
            for nbytes, members in ordered:
                if nbytes == 0:
                    where = Tier.DEVICE
                elif nbytes <= room - cpu:
                    where, cpu = Tier.CPU, cpu + nbytes
                else:
                    where, disk = Tier.DISK, disk + nbytes
                tier.update({x: where for x in members})
            return tier, cpu, disk

        tier, cpu, disk = fill(budget.cpu)
        staging = 0
        if disk and budget.pinned:   # as in `_place`: the disk's pinned staging is host memory
            staging = choice.slots * largest
            tier, cpu, disk = fill(budget.cpu - staging)
        dev = sum(self.size[k] for k in on_device)
        slots = choice.slots if cpu + disk else 0
        factor = 1.0 if slots != 1 or self.opt.stream_slots == 1 else self.opt.no_prefetch_factor
        cost = compute + factor * (self.opt.cpu_penalty * cpu + self.opt.disk_penalty * disk)
        return StageLayout(a, b, tuple(tier[x] for x in units), (dev, cpu, disk), compute, cost,
                           kv + work + slots * largest, slots, largest if slots else 0, kv, work,
                           staging)


class _TiedGroup:
    """Units of one stage joined by shared keys, and what each resident subset of them
    gives: resident bytes, the pieces the others stream, their largest fetch."""

    def __init__(self, model: StageModel, units: list[int]) -> None:
        if len(units) <= _MAX_TIED_GROUP:
            subsets = itertools.chain.from_iterable(itertools.combinations(units, k)
                                                    for k in range(len(units) + 1))
        else:  # too many to enumerate: all or nothing resident
            subsets = iter(((), tuple(units)))
        self.configs = [_GroupConfig(model, units, frozenset(s)) for s in subsets]


class _GroupConfig:
    def __init__(self, model: StageModel, units: list[int], members: frozenset) -> None:
        on_device = {k for x in members for k in model.keys[x]}
        fetch = {x: {k for k in model.keys[x] if k not in on_device} for x in units if x not in members}
        self.members = members
        self.resident = sum(model.size[k] for k in on_device)
        self.fetch = max((sum(model.size[k] for k in f) for f in fetch.values()), default=0)
        self.pieces = [sum(model.size[k] for k in keys) for _, keys in _merge_pieces(fetch)]


def _merge_pieces(fetch: dict[int, set]) -> list[tuple[set, set]]:
    """(units, keys) pieces: the fetches of units that share a key joined into one."""
    pieces: list[tuple[set, set]] = []
    for x in sorted(fetch):
        units, keys = {x}, set(fetch[x])
        for piece in [p for p in pieces if p[1] & keys]:
            pieces.remove(piece)
            units |= piece[0]
            keys |= piece[1]
        pieces.append((units, keys))
    return pieces


def _place(pieces, classes, cpu: int, staging: int = 0) -> tuple[int, float]:
    """(cpu bytes, disk bytes) of streamed `pieces` (sizes) and `classes` ((size, count)
    pairs), placed largest first on the CPU tier while each fits. If any goes to disk,
    its pinned `staging` (0 off a GPU) takes its share of `cpu` first (disk bytes INF: not
    even the staging fits)."""
    items = sorted([(p, 1) for p in pieces] + [wc for wc in classes if wc[1] and wc[0]], reverse=True)

    def fill(room: int) -> tuple[int, int]:
        on_cpu = on_disk = 0
        for w, c in items:
            take = min(c, (room - on_cpu) // w) if w else c
            on_cpu += take * w
            on_disk += (c - take) * w
        return on_cpu, on_disk

    on_cpu, on_disk = fill(cpu)
    if on_disk and staging:
        if staging > cpu:
            return on_cpu, INF
        on_cpu, on_disk = fill(cpu - staging)
    return on_cpu, on_disk


class _SparseMax:
    """Range maximum in O(1) after O(n log n) preparation."""

    def __init__(self, values: Sequence[int]) -> None:
        self.table = [list(values)]
        while (2 << (len(self.table) - 1)) <= len(values):
            prev, half = self.table[-1], 1 << (len(self.table) - 1)
            self.table.append([max(prev[x], prev[x + half]) for x in range(len(prev) - half)])

    def query(self, a: int, b: int) -> int:
        if a >= b:
            return 0
        level = (b - a).bit_length() - 1
        row = self.table[level]
        return max(row[a], row[b - (1 << level)])
