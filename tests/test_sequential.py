"""The single-process plan behind device maps (`distload.plan.sequential`): GPUs, then
cpu, then disk — against brute force over every tail start, every split of the rest over
the GPUs and 1 or 2 streaming slots."""

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distload.errors import PlanError
from distload.plan.planner import PlannerOptions, UnitLoad
from distload.plan.sequential import partition_sequential
from distload.plan.types import Tier

OPT = PlannerOptions()


def _bytes(units) -> int:
    keys = {}
    for u in units:
        for k, n in u.items:
            keys.setdefault(k, n)
    return sum(keys.values())


def _own(unit) -> int:
    return _bytes([unit])


def reference(units, gpus, cpu, disk, opt=OPT):
    """The least bottleneck: GPU stages all resident, then a tail streamed onto GPU 0
    (its longest prefix within `cpu` on the CPU tier, the rest on disk; with anything on
    disk, its pinned staging — slots x the tail's largest unit — out of `cpu` first)."""
    n, best = len(units), math.inf
    for t in range(n + 1):
        tail = units[t:]
        for used in range(0, min(len(gpus), t) + 1):
            if (used == 0) != (t == 0):
                continue
            for cuts in itertools.combinations(range(1, t), max(used - 1, 0)):
                bounds = (0, *cuts, t) if used else (0,)
                for slots in ((0,) if not tail else range(1, opt.stream_slots + 1)):
                    room = slots * max((_own(u) for u in tail), default=0)
                    if room > gpus[0]:
                        continue
                    costs = []
                    for r, (a, b) in enumerate(zip(bounds, bounds[1:])):
                        cap = gpus[r] - (room if r == 0 else 0)
                        seg = units[a:b]
                        fits = _bytes(seg) + sum(u.kv_bytes for u in seg) + max(u.work_bytes for u in seg) <= cap
                        costs.append(sum(u.cost for u in seg) if fits else math.inf)
                    if tail:
                        k = max(x for x in range(t, n + 1) if _bytes(units[t:x]) <= cpu)
                        on_cpu = _bytes(units[t:k])
                        on_disk = _bytes(tail) - on_cpu
                        if on_disk and room:   # the disk's pinned staging (slots x largest) takes cpu first
                            if room > cpu:
                                continue
                            k = max(x for x in range(t, n + 1) if _bytes(units[t:x]) <= cpu - room)
                            on_cpu = _bytes(units[t:k])
                            on_disk = _bytes(tail) - on_cpu
                        factor = opt.no_prefetch_factor if slots == 1 and opt.stream_slots == 2 else 1.0
                        cost = sum(u.cost for u in tail) + factor * (opt.cpu_penalty * on_cpu + opt.disk_penalty * on_disk)
                        costs.append(cost if disk is None or on_disk <= disk else math.inf)
                    best = min(best, max(costs))
    return best


@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    units = [UnitLoad(f"u{i}", draw(st.integers(0, 20)), ((f"w{i}", draw(st.integers(0, 100))),)) for i in range(n)]
    if n > 1 and draw(st.booleans()):
        last = units[-1]
        units[-1] = UnitLoad(last.name, last.cost, last.items + (("w0", units[0].items[0][1]),))
    gpus = [draw(st.integers(0, 400)) for _ in range(draw(st.integers(1, 3)))]
    return units, gpus, draw(st.integers(0, 200)), draw(st.one_of(st.none(), st.integers(0, 300)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_sequential_is_optimal_in_accelerates_order(problem):
    units, gpus, cpu, disk = problem
    best = reference(units, gpus, cpu, disk)
    if best == math.inf:
        with pytest.raises(PlanError):
            partition_sequential(units, gpus, cpu=cpu, disk=disk)
        return
    plan = partition_sequential(units, gpus, cpu=cpu, disk=disk)
    part = plan.partition
    assert math.isclose(part.bottleneck, best, rel_tol=1e-9) or part.bottleneck == best
    assert max(s.cost for s in part.stages) == part.bottleneck
    tiers = part.tiers
    assert len(tiers) == len(units) and part.bounds[0] == 0 and part.bounds[-1] == len(units)
    rank = {Tier.DEVICE: 0, Tier.CPU: 1, Tier.DISK: 2}          # GPUs, then cpu, then disk
    assert [rank[t] for t in tiers] == sorted(rank[t] for t in tiers)
    gpu_stages = part.stages[:plan.gpus_used]
    room = part.stages[-1].reserved if plan.tail else 0
    for r, s in enumerate(gpu_stages):
        assert set(s.tiers) == {Tier.DEVICE} and s.tier_bytes[0] + s.reserved + (room if r == 0 else 0) <= gpus[r]
    if plan.tail:
        tail = part.stages[-1]
        assert tail.tier_bytes[1] + tail.staging_bytes <= cpu and (disk is None or tail.tier_bytes[2] <= disk)
        assert tail.staging_bytes == (tail.stream_slots * tail.stream_bytes if tail.tier_bytes[2] else 0)
        assert room <= gpus[0] and tail.stream_slots in (1, 2)


def test_a_run_reserve_for_the_tail_stays_on_the_first_gpu():
    units = [UnitLoad(f"u{i}", 1.0, ((f"w{i}", 100),), kv_bytes=10, work_bytes=20) for i in range(8)]
    plan = partition_sequential(units, [450, 450], cpu=200, disk=None)
    first, tail = plan.partition.stages[0], plan.partition.stages[-1]
    assert plan.tail and tail.reserved == tail.kv_bytes + tail.work_bytes + tail.stream_slots * 100
    assert first.tier_bytes[0] + first.reserved + tail.reserved <= 450


def test_the_disk_tiers_pinned_staging_comes_out_of_cpu():
    """As the multi-rank planner counts it for a GPU rank (`StageModel.layout`): what the
    tail streams from disk goes through pinned host staging, slots x its largest unit,
    held beside the cpu tier — so fewer units fit on cpu than its budget alone would take."""
    units = [UnitLoad(f"u{i}", 1.0, ((f"w{i}", 100),)) for i in range(4)]
    plan = partition_sequential(units, [250], cpu=250, disk=None)
    tail = plan.partition.stages[-1]
    assert plan.tail and tail.tier_bytes[2] > 0
    assert tail.staging_bytes == tail.stream_slots * 100
    assert tail.tier_bytes[1] + tail.staging_bytes <= 250
    assert "pinned staging" in plan.partition.reasons[-1]
    # with no room for the staging itself, nothing streams from disk
    with pytest.raises(PlanError, match="pinned staging"):
        partition_sequential(units, [250], cpu=50, disk=None)


@pytest.mark.parametrize("pinned", [True, False])
def test_single_process_plan_records_the_disk_staging(pinned):
    """A device map's world-of-one plan says the host memory the disk tier's streaming
    takes on a GPU, as a multi-rank plan does: ``reserve["host_staging"]``, slots x the
    largest unit's disk bytes (the streamer's reused pinned buffers); none off a GPU."""
    from distload.checkpoint.types import TensorMeta
    from distload.plan.sequential import Placement, single_process_plan

    shapes = {"a.weight": (8, 4), "b.weight": (16, 4), "b.bias": (16,), "c.weight": (2, 4)}
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        length = math.prod(shape) * 4
        tensors[name] = TensorMeta(name, "model.safetensors", "float32", shape, offset, length)
        offset += length
    tiers = {"a": Tier.CPU, "b": Tier.DISK, "c": Tier.DISK}
    placements = [Placement(n, n, n.split(".")[0], "float32", tiers[n.split(".")[0]]) for n in shapes]
    plan = single_process_plan([("a", 1.0), ("b", 1.0), ("c", 1.0)], placements, tensors,
                               source={"kind": "local", "label": "x"}, format="safetensors",
                               file_sizes={"model.safetensors": offset}, stream_slots=2, pinned=pinned)
    stage = plan.stage(0)
    largest_disk_unit = (16 * 4 + 16) * 4     # unit b; unit a streams from host memory, not disk
    assert stage.reserve == ({"host_staging": 2 * largest_disk_unit} if pinned else {})


def test_single_process_plan_names_the_buffers_files():
    """The persistent buffers a device map's load fills are in its plan: their files are
    among those the node fetches (a hub id) and checks, also a file that holds only
    buffers, and the plan survives its JSON."""
    from distload.checkpoint.types import TensorMeta
    from distload.plan.sequential import Placement, single_process_plan
    from distload.plan.types import LoadPlan

    tensors = {"lin.weight": TensorMeta("lin.weight", "weights.safetensors", "float32", (2, 2), 8, 16),
               "norm.running_mean": TensorMeta("norm.running_mean", "stats.safetensors", "float32", (2,), 8, 8)}
    plan = single_process_plan([("lin", 8.0)], [Placement("lin.weight", "lin.weight", "lin", "float32")], tensors,
                               source={"kind": "local", "label": "x"}, format="safetensors",
                               file_sizes={"weights.safetensors": 24, "stats.safetensors": 16},
                               buffers=["norm.running_mean"])
    stage = plan.stage(0)
    assert [m.name for m in stage.reads] == ["lin.weight"] and stage.tensor_bytes == 16
    assert [m.name for m in stage.buffers] == ["norm.running_mean"]
    assert stage.files == ("stats.safetensors", "weights.safetensors")
    assert LoadPlan.from_json(plan.to_json()) == plan
