"""Pure planning: hand-built model descriptions and tensor metadata, no files or processes."""

import itertools
import json
import os
import subprocess
import sys

import pytest

from distload.checkpoint.types import TensorMeta
from distload.meta.describe import ModelSpec, ParamSpec, UnitSpec
from distload.errors import LoadError, PlanError
from distload.plan import LoadPlan, make_plan, min_max_partition


def _spec(layers=4, hidden=8, vocab=32, tied=False) -> tuple[ModelSpec, dict[str, TensorMeta]]:
    """A Llama-shaped description and a two-file checkpoint laid out by hand."""
    units = [UnitSpec("model.embed_tokens", (ParamSpec("model.embed_tokens.weight", (vocab, hidden)),), 0.0)]
    for i in range(layers):
        units.append(UnitSpec(f"model.layers.{i}", (
            ParamSpec(f"model.layers.{i}.norm.weight", (hidden,)),
            ParamSpec(f"model.layers.{i}.proj.weight", (hidden, hidden)),
        ), 2.0 * hidden * hidden))
    units.append(UnitSpec("model.norm", (ParamSpec("model.norm.weight", (hidden,)),), 0.0))
    units.append(UnitSpec("lm_head", (ParamSpec("lm_head.weight", (vocab, hidden)),), 2.0 * hidden * vocab))
    groups = (("lm_head.weight", "model.embed_tokens.weight"),) if tied else ()
    spec = ModelSpec(units=tuple(units), tied=groups, no_split_classes=())

    tensors, offset = {}, {"a.safetensors": 100, "b.safetensors": 200}
    for u in units:
        for p in u.params:
            if tied and p.name == "lm_head.weight":
                continue  # tied checkpoints omit the head
            file = "a.safetensors" if "layers.0" in p.name or "embed" in p.name else "b.safetensors"
            length = p.numel * 2
            tensors[p.name] = TensorMeta(p.name, file, "bfloat16", p.shape, offset[file], length)
            offset[file] += length
    return spec, tensors


def _plan(world, **kw):
    spec, tensors = _spec(**kw)
    return make_plan(spec, tensors, world_size=world, source={"kind": "local", "label": "ckpt"}, format="safetensors",
                     config={"model_type": "llama"}), tensors


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("tied", [False, True])
def test_every_tensor_read_exactly_once_and_ranges_disjoint(world, tied):
    plan, tensors = _plan(world, tied=tied)
    reads = [m for s in plan.stages for m in s.reads]
    assert sorted(m.name for m in reads) == sorted(tensors)          # each key once
    assert sum(s.tensor_bytes for s in plan.stages) == sum(m.length for m in tensors.values())
    for file in {m.file for m in reads}:
        spans = sorted((m.offset, m.offset + m.length) for m in reads if m.file == file)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stages_are_contiguous_and_cover_all_units(world):
    plan, _ = _plan(world)
    units = [u for s in plan.stages for u in s.units]
    assert units == ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(4)] + ["model.norm", "lm_head"]
    assert all(s.units for s in plan.stages)
    assert plan.stages[0].units[0] == "model.embed_tokens" and plan.stages[-1].units[-1] == "lm_head"


def test_tied_head_on_another_rank_is_read_once_and_sent():
    plan, tensors = _plan(2, tied=True)
    first, last = plan.stages
    head = next(p for p in last.params if p.param == "lm_head.weight")
    assert head.key == "model.embed_tokens.weight" and head.src_rank == 0
    assert ("model.embed_tokens.weight", 1) in first.sends
    assert all(m.name != "model.embed_tokens.weight" for m in last.reads)


def test_tied_on_one_rank_shares_storage_bytes():
    plan, tensors = _plan(1, tied=True)
    (stage,) = plan.stages
    assert stage.sends == ()
    assert stage.param_bytes == sum(m.length for m in tensors.values())  # the shared tensor once


def test_dtype_cast_changes_param_bytes_not_read_bytes():
    spec, tensors = _spec()
    plan = make_plan(spec, tensors, world_size=2, source={"kind": "local", "label": "c"}, format="safetensors", config={},
                     dtype="float32")
    assert sum(s.param_bytes for s in plan.stages) == 2 * sum(m.length for m in tensors.values())
    assert sum(s.tensor_bytes for s in plan.stages) == sum(m.length for m in tensors.values())
    assert all(p.dtype == "float32" for s in plan.stages for p in s.params)


def test_missing_key_is_named():
    spec, tensors = _spec()
    del tensors["model.layers.2.proj.weight"]
    with pytest.raises(LoadError, match=r"model\.layers\.2\.proj\.weight"):
        make_plan(spec, tensors, world_size=2, source={"kind": "local", "label": "c"}, format="safetensors", config={})


def test_unexpected_key_is_error_unless_not_strict():
    spec, tensors = _spec()
    tensors["extra.weight"] = TensorMeta("extra.weight", "b.safetensors", "bfloat16", (2,), 10_000, 4)
    with pytest.raises(LoadError, match=r"extra\.weight.*strict"):
        make_plan(spec, tensors, world_size=2, source={"kind": "local", "label": "c"}, format="safetensors", config={})
    plan = make_plan(spec, tensors, world_size=2, source={"kind": "local", "label": "c"}, format="safetensors", config={}, strict=False)
    assert plan.unexpected_keys == ("extra.weight",)
    assert all(m.name != "extra.weight" for s in plan.stages for m in s.reads)


def test_shape_mismatch_names_tensor_and_file():
    spec, tensors = _spec()
    m = tensors["model.norm.weight"]
    tensors["model.norm.weight"] = TensorMeta(m.name, m.file, m.dtype, (7,), m.offset, 14)
    with pytest.raises(LoadError, match=r"model\.norm\.weight.*b\.safetensors.*\[7\]"):
        make_plan(spec, tensors, world_size=1, source={"kind": "local", "label": "c"}, format="safetensors", config={})


def test_too_many_ranks_is_a_plan_error():
    with pytest.raises(PlanError, match="at most 7"):
        _plan(8)


def test_plan_json_round_trip_and_digest():
    plan, _ = _plan(3, tied=True)
    again = LoadPlan.from_json(plan.to_json())
    assert again == plan and again.digest() == plan.digest()
    json.loads(plan.to_json())


def test_plan_is_deterministic_across_hash_seeds():
    code = ("from tests.test_plan import _plan; p, _ = _plan(3, tied=True); print(p.digest())")
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def _brute_force(costs, parts):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        b = (0, *cuts, n)
        worst = max(sum(costs[x:y]) for x, y in zip(b, b[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs,parts", [
    ([1, 1, 1, 3], 2), ([5, 1, 1, 1, 1, 1], 2), ([0, 4, 4, 4, 4, 4, 4, 4, 4, 0.1, 16], 3),
    ([3, 1, 4, 1, 5, 9, 2, 6], 4), ([1], 1), ([2, 2], 2),
])
def test_partition_is_optimal(costs, parts):
    bounds = min_max_partition(costs, parts)
    assert bounds[0] == 0 and bounds[-1] == len(costs) and len(bounds) == parts + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert worst == pytest.approx(_brute_force(costs, parts))
