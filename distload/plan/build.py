"""Build the `LoadPlan` from a model description and checkpoint metadata (pure)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ..checkpoint.quant import Encoded
from ..checkpoint.types import TensorMeta
from ..checkpoint.dtypes import cast_dtype, dtype_from_name, is_floating
from ..errors import LoadError, PlanError
from ..meta.describe import ModelSpec
from .partition import min_max_partition
from .types import LoadPlan, ParamSource, StagePlan, Tier

__all__ = ["match_params_to_keys", "make_plan", "key_dtypes"]


def match_params_to_keys(
    spec: ModelSpec, tensors: Mapping[str, TensorMeta], *, strict: bool = True
) -> tuple[dict[str, str], list[str]]:
    """Map every parameter to the checkpoint key that fills it, and list unused keys.

    A parameter reads its own name; a tied parameter whose name is absent reads the
    first present member of its group (HF checkpoints omit `lm_head.weight` when it is
    tied). Keys matching the model's `ignored_keys` (saved buffers it recomputes) are
    neither used nor unexpected. Raises `LoadError` naming missing keys and shape
    mismatches, and unexpected keys when `strict`.
    """
    group_of = {name: group for group in spec.tied for name in group}
    param_to_key: dict[str, str] = {}
    missing: list[str] = []
    for unit in spec.units:
        for p in unit.params:
            candidates = (p.name,) + tuple(n for n in group_of.get(p.name, ()) if n != p.name)
            key = next((c for c in candidates if c in tensors), None)
            if key is None:
                missing.append(p.name)
                continue
            meta = tensors[key]
            if tuple(meta.shape) != tuple(p.shape):
                raise LoadError(
                    f"shape mismatch for {p.name}: the model expects {list(p.shape)}, "
                    f"checkpoint tensor {key} in {meta.file} has {list(meta.shape)}")
            if p.dtype is not None and is_floating(p.dtype) != is_floating(meta.dtype):
                kind = "floating-point" if is_floating(p.dtype) else "integer"
                raise LoadError(
                    f"dtype mismatch for {p.name}: the model needs {kind} values, checkpoint "
                    f"tensor {key} in {meta.file} is {meta.dtype}")
            param_to_key[p.name] = key
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise LoadError(f"{len(missing)} parameter(s) missing from the checkpoint: {shown}"
                        f"{_packed_experts_hint(missing, tensors)}")
    used = set(param_to_key.values())
    ignored = [re.compile(p) for p in spec.ignored_keys]
    unexpected = sorted(k for k in tensors
                        if k not in used and not any(p.search(k) for p in ignored))
    if unexpected and strict:
        shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
        raise LoadError(f"{len(unexpected)} unexpected key(s) in the checkpoint: {shown} "
                        "(pass strict=False / --no-strict to ignore them)")
    return param_to_key, unexpected


def key_dtypes(param_to_key: Mapping[str, str], tensors: Mapping[str, TensorMeta], dtype: str | None,
               keep_float32: Sequence[str] = ()) -> dict[str, str]:
    """The dtype each used checkpoint key is materialized in: `dtype` for floating tensors
    (None: as stored), but float32 for a key filling a parameter whose name one of the
    `keep_float32` regexes finds (a family's, for this `dtype`: `ModelFamily.float32_params`).

    Example::

        key_dtypes({"mlp.gate.weight": "mlp.gate.weight"}, tensors, "bfloat16", [r"\\.gate\\.weight$"])
        # {"mlp.gate.weight": "float32"}
    """
    kept = [re.compile(p) for p in keep_float32]
    fp32 = {k for p, k in param_to_key.items() if any(r.search(p) for r in kept)}
    return {k: "float32" if k in fp32 and is_floating(tensors[k].dtype) else cast_dtype(tensors[k].dtype, dtype)
            for k in set(param_to_key.values())}


def _itemsize(dtype_name: str) -> int:
    return dtype_from_name(dtype_name).itemsize


def make_plan(
    spec: ModelSpec,
    tensors: Mapping[str, TensorMeta],
    *,
    world_size: int,
    source: dict,
    format: str,
    config: dict,
    dtype: str | None = None,
    file_sizes: Mapping[str, int] | None = None,
    activation_dtype: str | None = None,
    strict: bool = True,
    bounds: Sequence[int] | None = None,
    unit_tiers: Sequence[str] | None = None,
    reserved_bytes: Sequence[int] | None = None,
    bound_reasons: Sequence[str] | None = None,
    encoded: Mapping[str, Encoded] | None = None,
    keep_float32: Sequence[str] = (),
) -> LoadPlan:
    """Assign contiguous runs of units to ranks and say what each rank reads.

    `bounds` (stage boundaries over `spec.units`) defaults to the split that balances
    stage bytes; the planner in `distload.plan.planner` passes its own. Deterministic:
    the same inputs give the same plan, whatever the process or hash seed. `tensors`
    name their files relative to the checkpoint root; `activation_dtype` defaults to
    the dtype of the first unit's first parameter. `encoded` (`distload.checkpoint.quant`)
    names the keys of `tensors` that are decoded from a quantized checkpoint's parts: the
    rank that reads such a key reads its parts (quantized bytes and scales), and its stage
    says how to decode them (`StagePlan.decode`); its size on the device is the decoded one.
    `keep_float32`: regexes of parameter names materialized in float32 whatever `dtype`
    (`key_dtypes`); the stages' sizes count them so.
    """
    encoded = encoded or {}
    param_to_key, unexpected = match_params_to_keys(spec, tensors, strict=strict)
    units = spec.units
    if world_size > len(units):
        raise PlanError(f"the model has {len(units)} units but the world has {world_size} ranks; "
                        f"use at most {len(units)} processes")

    dtypes = key_dtypes(param_to_key, tensors, dtype, keep_float32)

    def target_dtype(key: str) -> str:
        return dtypes[key]

    def param_bytes(pname: str) -> int:
        key = param_to_key[pname]
        return tensors[key].numel * _itemsize(target_dtype(key))

    unit_bytes = {u.name: sum(param_bytes(p.name) for p in u.params) for u in units}
    if bounds is None:
        bounds = min_max_partition([unit_bytes[u.name] for u in units], world_size)
    cut = [units[b].name for b in bounds[1:-1] if units[b].name in spec.joined]
    if cut:
        raise PlanError(f"a stage boundary falls before unit {cut[0]}, which must stay on the stage of "
                        "the unit before it (the model's joined_units)")
    tiers = list(unit_tiers) if unit_tiers is not None else [Tier.DEVICE] * len(units)

    # Who reads each key: the lowest rank holding a parameter filled from it; that rank
    # sends it to the others that hold it (tied embeddings on the first and last stage).
    # Read once and sent, rather than read by both, because (1) the storage a checkpoint
    # sits on (a shared file system, one NVMe) is the slower link — a rank-to-rank send
    # over NVLink/InfiniBand, or shared memory on one node, is cheaper than a second read;
    # (2) it keeps the invariant that the ranks together read exactly the checkpoint's
    # bytes; (3) the tied tensor is one embedding matrix, so the send is a single message.
    rank_of_unit = {units[i].name: r for r in range(world_size) for i in range(bounds[r], bounds[r + 1])}
    unit_of_param = spec.unit_of()
    reader: dict[str, int] = {}
    for pname, key in param_to_key.items():
        r = rank_of_unit[unit_of_param[pname]]
        reader[key] = min(r, reader.get(key, r))

    stages = []
    for r in range(world_size):
        stage_units = units[bounds[r]:bounds[r + 1]]
        pnames = [p.name for u in stage_units for p in u.params]
        stage_tiers = tiers[bounds[r]:bounds[r + 1]]
        tier_of_unit = {u.name: t for u, t in zip(stage_units, stage_tiers)}
        home: dict[str, str] = {}  # key -> the most resident tier of the units using it here
        for pname in pnames:
            t = tier_of_unit[unit_of_param[pname]]
            key = param_to_key[pname]
            home[key] = Tier.most_resident((home.get(key, t), t))
        params = tuple(ParamSource(p, param_to_key[p], reader[param_to_key[p]],
                                   target_dtype(param_to_key[p]), home[param_to_key[p]])
                       for p in pnames)
        own_keys = {ps.key for ps in params if ps.src_rank == r}
        raw = [part for k in own_keys for part in (encoded[k].parts if k in encoded else (tensors[k],))]
        reads = tuple(sorted(raw, key=lambda m: (m.file, m.offset)))
        needed_by = sorted({(param_to_key[p.name], dst) for dst in range(world_size) if dst != r
                            for u in units[bounds[dst]:bounds[dst + 1]] for p in u.params
                            if reader[param_to_key[p.name]] == r})
        held = {param_to_key[p] for p in pnames}  # tied params on one stage share storage
        stages.append(StagePlan(
            rank=r,
            units=tuple(u.name for u in stage_units),
            unit_tiers=tuple(stage_tiers),
            params=params,
            reads=reads,
            sends=tuple(needed_by),
            tensor_bytes=sum(m.length for m in reads),
            param_bytes=sum(tensors[k].numel * _itemsize(target_dtype(k)) for k in held),
            cost=float(sum(u.cost for u in stage_units)),
            reserved_bytes=int(reserved_bytes[r]) if reserved_bytes is not None else 0,
            bound=bound_reasons[r] if bound_reasons is not None else "",
            decode={k: encoded[k].as_dict() for k in sorted(own_keys) if k in encoded},
        ))
    if activation_dtype is None:
        first = units[0].params[0].name
        activation_dtype = target_dtype(param_to_key[first])
    return LoadPlan(
        source=dict(source), format=format, config=dict(config), dtype=dtype,
        world_size=world_size, stages=tuple(stages),
        checkpoint_bytes=sum(m.length for m in tensors.values()), unit_bytes=unit_bytes,
        no_split_units=tuple(u.name for u in units), unexpected_keys=tuple(unexpected),
        file_sizes=dict(sorted((file_sizes or {}).items())), activation_dtype=activation_dtype,
    )


def _packed_experts_hint(missing: list[str], tensors: Mapping[str, TensorMeta]) -> str:
    """Why a model's packed MoE experts (`mlp.experts.gate_up_proj`, transformers 5's
    in-memory layout) find nothing in a checkpoint that holds one tensor per expert (the
    hub's layout, which transformers converts while loading)."""
    packed = [m for m in missing if re.search(r"\.experts\.(gate_up_proj|down_proj|w1|w2|w3)$", m)]
    if not packed:
        return ""
    per_expert = next((k for k in sorted(tensors) if ".experts.0." in k), None)
    if per_expert is None:
        return ""
    return (f" (this model packs its experts, {packed[0]}; the checkpoint holds one tensor per "
            f"expert, {per_expert}: load it with distload.load, or build the model with "
            "distload.models.build_model(config) under init_empty_weights(); those read either layout)")

