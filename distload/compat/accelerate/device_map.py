"""`infer_auto_device_map` and `get_balanced_memory` with accelerate's meaning.

In one process the map is accelerate's own (`greedy.py`) whenever it fits the budgets.
distload's planner (`plan_device_map`) answers where accelerate's map breaks a budget,
where a run shape is asked (`max_batch_size` / `max_seq_len`), and plans the pipeline
under torchrun. What the planner does differently from accelerate:

* accelerate's order is kept — the GPUs' stages, then "cpu", then "disk" — but the GPUs
  get contiguous stages that minimise the costliest stage (per-token FLOPs), not a greedy
  fill of GPU 0 first; what does not fit goes to "cpu" then "disk" after the last GPU's
  stage, within `max_memory["cpu"]` and `max_memory["disk"]`, and the first GPU (where
  offloaded modules run) keeps room to stream them, prefetched where two fit
  (`distload.plan.sequential`). Never an offloaded module between two GPUs.
* Without GPUs, "cpu" is the device: any set of units stays there (the largest too — a
  big embedding resident while small layers stream from "disk"), as the planner's stage
  model chooses (`distload.plan.stage`).
* GPU keys for GPUs this machine lacks still give a map (a plan for another machine, as on
  a login node), with a warning; loading onto a missing GPU then fails before any read.
* Sizes parse strictly (``"20GB"`` = 10^9 bytes, ``"20GiB"`` = 2^30, ``"20gb"`` is bytes,
  ``"20G"`` is an error); the caller's `max_memory` dict is never changed.
* No-split units are found without being told: the repeated children of a
  `ModuleList`/`ModuleDict` and the model's `_no_split_modules` (see `describe_model`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from ...checkpoint.dtypes import dtype_from_name, normalize_dtype
from ...errors import PlanError
from ...loader.memory import default_limits
from ...log import logger
from ...meta import describe_model, persistent_buffers
from ...plan.budget import RankBudget, format_bytes, parse_max_memory
from ...plan.planner import Partition, PlannerOptions, UnitLoad, partition
from ...plan.reserve import run_shape, unit_reserves
from ...plan.sequential import partition_sequential
from ...plan.types import Tier
from .greedy import GreedyMap, balanced_memory, clean_device_map, greedy_device_map

__all__ = ["infer_auto_device_map", "get_balanced_memory", "plan_device_map", "DeviceMapPlan", "DeviceMap", "as_dtype", "Device"]

Device = int | str


class DeviceMap(dict):
    """The dict `infer_auto_device_map` returns (use it as any device map), carrying
    `stream_slots`: how many offloaded units the plan keeps room for on the device that
    runs them (2: the next is prefetched; 1: no prefetch; 0: nothing offloaded), which
    `load_checkpoint_and_dispatch` honours."""

    stream_slots: int = 2


@dataclass(frozen=True)
class DeviceMapPlan:
    """`plan_device_map`'s answer: the uncleaned device map (per unit, plus modules that
    hold only buffers), the device each stage runs on, and the planner's `Partition` —
    with GPUs, one stage per GPU used and, when `offloaded`, a last stage of the "cpu" /
    "disk" units (run on the first GPU)."""

    device_map: dict[str, Device]
    units: tuple[str, ...]
    devices: tuple[Device, ...]
    partition: Partition
    offloaded: bool = False


def _itemsize(t: torch.Tensor, name: str, dtype, special: Mapping) -> int:
    if name in special:
        return as_dtype(special[name]).itemsize
    if dtype is not None and t.is_floating_point():
        return as_dtype(dtype).itemsize
    return t.element_size()


def as_dtype(d) -> torch.dtype:
    """A `torch.dtype` from accelerate's ways of naming one (``torch.float16``,
    ``"float16"``, ``"fp16"``); "auto"/None mean float32 here, as in accelerate."""
    if isinstance(d, torch.dtype):
        return d
    name = normalize_dtype(d)
    return dtype_from_name(name) if name else torch.float32


def _config_dict(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def plan_device_map(model: nn.Module, max_memory: Mapping | None = None, *,
                    no_split_module_classes=None, dtype=None, special_dtypes: Mapping | None = None,
                    max_batch_size: int | None = None, max_seq_len: int | None = None,
                    workload: str = "any", options: PlannerOptions | None = None) -> DeviceMapPlan:
    """Plan `model` (usually on meta) onto the GPUs named in `max_memory` (default: every
    visible GPU's free memory, and 90 % of available RAM), then "cpu", then "disk" (see the
    module docstring). `workload` ("forward", "generate" or "any") sets what the run
    reserve of `max_batch_size` x `max_seq_len` holds (`distload.plan.reserve`).

    Example::

        p = plan_device_map(model, {0: "10GiB", 1: "10GiB", "cpu": "64GiB"})
        p.device_map, p.partition.bottleneck
    """
    limits = default_limits() if max_memory is None else parse_max_memory(max_memory)
    spec = _with_hf_head(model, describe_model(model, no_split_module_classes=no_split_module_classes))
    if not spec.units:
        raise PlanError(f"{type(model).__name__} has no parameters to place")
    special = dict(special_dtypes or {})
    key_of = {name: group[0] for group in spec.tied for name in group}
    loads = []
    shape = None
    if max_batch_size is not None or max_seq_len is not None:
        shape = run_shape(_config_dict(model), max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                          workload=workload)
    itemsize = as_dtype(dtype).itemsize if dtype is not None else next(
        (p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
    reserves = unit_reserves(spec, shape, itemsize=itemsize, config=_config_dict(model))
    for unit, res in zip(spec.units, reserves):
        module = model.get_submodule(unit.name)
        items = [(key_of.get(f"{unit.name}.{n}", f"{unit.name}.{n}"), t.numel() * _itemsize(t, f"{unit.name}.{n}", dtype, special))
                 for n, t in module.named_parameters(remove_duplicate=False)]
        items += [(f"{unit.name}.{n}", t.numel() * _itemsize(t, f"{unit.name}.{n}", dtype, special))
                  for n, t in persistent_buffers(module)]
        loads.append(UnitLoad(unit.name, unit.cost, tuple(items), res.kv_bytes, res.work_bytes))
    gpus = sorted(k for k in limits if isinstance(k, int))
    cpu, disk = limits.get("cpu", 0), limits.get("disk")
    where: dict[str, Device] = {}
    if gpus:
        _warn_missing(gpus)
        seq = partition_sequential(loads, [limits[g] for g in gpus], cpu=cpu, disk=disk, options=options)
        part, offloaded = seq.partition, seq.tail
        devices: tuple[Device, ...] = tuple(gpus[:seq.gpus_used]) + ((gpus[0],) if offloaded else ())
        for r, stage in enumerate(part.stages):
            for i, tier in zip(range(stage.lo, stage.hi), stage.tiers):
                where[loads[i].name] = gpus[r] if r < seq.gpus_used else tier
        first: Device = gpus[0]
    else:
        part, offloaded = partition(loads, [RankBudget(cpu, 0, disk, source="max_memory['cpu']")], options), False
        devices, first = ("cpu",), "cpu"
        for i, tier in enumerate(part.tiers):
            where[loads[i].name] = "cpu" if tier == Tier.DEVICE else tier
    device_map = _with_leftovers(model, where, first)
    return DeviceMapPlan(device_map, tuple(u.name for u in spec.units), devices, part, offloaded)


def _with_hf_head(model: nn.Module, spec):
    """`spec`, its head a unit named ``lm_head`` where the model has no
    ``get_output_embeddings()`` (a plain `nn.Module` written after a transformers model):
    Hugging Face's name for the head, which a generation's reserve counts as such."""
    if spec.head or not isinstance(getattr(model, "lm_head", None), nn.Module):
        return spec
    return replace(spec, head="lm_head") if any(u.name == "lm_head" for u in spec.units) else spec


def _warn_missing(gpus: list[int]) -> None:
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [g for g in gpus if g >= present]
    if missing:
        have = "no CUDA device" if not present else f"only {present} GPU(s)"
        logger.warning("max_memory names GPU(s) %s but this machine has %s: the device map is a plan "
                       "for them; loading onto it here will fail", ", ".join(map(str, missing)), have)


def _with_leftovers(model: nn.Module, where: dict[str, Device], first: Device) -> dict[str, Device]:
    """`where` plus every module outside the units that holds tensors of its own (RoPE
    buffers), on the first device (where the model's forward begins); in module order."""
    out: dict[str, Device] = {}
    for name, mod in model.named_modules():
        if name in where:
            out[name] = where[name]
        elif not _covered(name, where) and (any(True for _ in mod.parameters(recurse=False))
                                            or any(True for _ in mod.buffers(recurse=False))):
            out[name] = first
    return out


def _covered(name: str, device_map: Mapping[str, Device]) -> bool:
    return any(k == "" or name == k or name.startswith(k + ".") for k in device_map)


def _clean(model: nn.Module, device_map: dict[str, Device]) -> dict[str, Device]:
    """Merge entries: a module whose tensors all sit on one device becomes one entry (the
    whole model on one device is ``{"": device}``), as accelerate's `clean_result`."""
    out: dict[str, Device] = {}

    def under(prefix: str) -> set:
        return {d for k, d in device_map.items()
                if not prefix or k == prefix or k.startswith(prefix + ".")}

    def visit(name: str, module: nn.Module) -> None:
        devices = under(name)
        if not devices:
            return
        if len(devices) == 1:
            out[name] = next(iter(devices))
            return
        if name in device_map:
            out[name] = device_map[name]
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", model)
    return out


def infer_auto_device_map(model: nn.Module, max_memory: Mapping | None = None,
                          no_split_module_classes=None, dtype=None, special_dtypes: Mapping | None = None,
                          verbose: bool = False, clean_result: bool = True, offload_buffers: bool = False,
                          fallback_allocation: bool = False, *, max_batch_size: int | None = None,
                          max_seq_len: int | None = None, workload: str = "any") -> dict[str, Device]:
    """``{module_name: device}`` for `model` (GPU index, "cpu" or "disk"), as accelerate's
    function of the same name, with all its keywords.

    One process runs the devices one after the other, so balancing them gains nothing:
    the map is accelerate's own (`greedy.py`: the first GPU filled first) whenever it
    fits the budgets. distload's planner (see the module docstring) answers instead where
    accelerate's map breaks one — more than ``max_memory["disk"]`` on disk — and whenever
    `max_batch_size` / `max_seq_len` ask for room on each GPU for activations and KV cache
    (for `workload` "forward", "generate" or "any"), which accelerate does not keep.

    Example::

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        infer_auto_device_map(model, max_memory={"cpu": "2GiB"})   # {'': 'cpu'}
    """
    if max_batch_size is None and max_seq_len is None:
        limits = default_limits() if max_memory is None else parse_max_memory(max_memory)
        cast = None if dtype is None else as_dtype(dtype)
        special = {k: as_dtype(v) for k, v in (special_dtypes or {}).items()}
        greedy = greedy_device_map(model, limits, no_split_module_classes, dtype=cast, special_dtypes=special,
                                   offload_buffers=offload_buffers, fallback_allocation=fallback_allocation,
                                   verbose=verbose)
        broken = _breaks_budget(greedy, limits)
        if broken is None:
            _warn_missing(sorted(k for k in limits if isinstance(k, int)))
            _tell_like_accelerate(greedy, limits, offload_buffers)
            out = DeviceMap(clean_device_map(dict(greedy.device_map)) if clean_result else dict(greedy.device_map))
            # accelerate keeps room for one offloaded layer on the main device: no prefetch
            out.stream_slots = 1 if any(d in ("cpu", "disk") for d in out.values()) else 0
            return out
        logger.info("accelerate's device map %s: distload plans the map instead", broken)
    plan = plan_device_map(model, max_memory, no_split_module_classes=no_split_module_classes,
                           dtype=dtype, special_dtypes=special_dtypes,
                           max_batch_size=max_batch_size, max_seq_len=max_seq_len, workload=workload)
    if verbose:
        for r, (dev, reason) in enumerate(zip(plan.devices, plan.partition.reasons)):
            stage = plan.partition.stages[r]
            logger.info("device %s: units %s..%s (%s)", dev, plan.units[stage.lo],
                        plan.units[stage.hi - 1], reason)
    out = DeviceMap(_clean(model, plan.device_map) if clean_result else plan.device_map)
    out.stream_slots = max((s.stream_slots for s in plan.partition.stages), default=0)
    return out


def _breaks_budget(greedy: GreedyMap, limits: Mapping) -> str | None:
    """Why accelerate's map does not fit `limits` (None: it fits). accelerate keeps every
    GPU and "cpu" within its budget by construction; "disk" it treats as unlimited."""
    disk = limits.get("disk")
    if disk is not None and greedy.used.get("disk", 0) > disk:
        return (f"puts {format_bytes(greedy.used['disk'])} on disk, over max_memory['disk'] "
                f"({format_bytes(disk)})")
    return None


def _tell_like_accelerate(greedy: GreedyMap, limits: Mapping, offload_buffers: bool) -> None:
    """accelerate's two messages: buffers of offloaded modules that fit no GPU (a warning:
    they go to the device when their module runs), and devices too small for any module."""
    gpus = [k for k in limits if isinstance(k, int)]
    offloaded = greedy.buffer_bytes.get("cpu", 0) + greedy.buffer_bytes.get("disk", 0)
    if offloaded and not offload_buffers and gpus and not any(
            limits[g] >= offloaded + greedy.used.get(g, 0) for g in gpus):
        warnings.warn(f"Current model requires {offloaded} bytes of buffer for offloaded layers, which "
                      "seems does not fit any GPU's remaining memory. If you are experiencing a OOM later, "
                      "please consider using offload_buffers=True.", stacklevel=3)
    if greedy.minimum:
        # accelerate's words (an info there), with the excess: a warning, since the weights
        # that fit nowhere stay on disk and stream onto the device that runs them
        lines = "; ".join(f"{d}: {m} bytes required, {format_bytes(limits.get(d, 0))} allowed "
                          f"({format_bytes(m - limits.get(d, 0))} over)" for d, m in greedy.minimum.items())
        logger.warning("Based on the current allocation process, no modules could be assigned to the following "
                       "devices due to insufficient memory: %s. What fits no device stays on disk and streams "
                       "onto the device that runs it", lines)


def get_balanced_memory(model: nn.Module, max_memory: Mapping | None = None, no_split_module_classes=None,
                        dtype=None, special_dtypes: Mapping | None = None, low_zero: bool = False) -> dict:
    """accelerate's `get_balanced_memory`, same meaning: `max_memory` (default: this
    machine's, see `infer_auto_device_map`) with each GPU but the last capped near an equal
    share of the model, so that `infer_auto_device_map` spreads it over every GPU
    (`low_zero`: GPU 0 holds only what the others cannot). Sizes parse as distload parses
    them; the caller's dict is never changed.

    Example::

        infer_auto_device_map(model, get_balanced_memory(model, {0: "10GiB", 1: "10GiB"}))
    """
    limits = default_limits() if max_memory is None else parse_max_memory(max_memory)
    return balanced_memory(model, limits, no_split_module_classes, dtype=None if dtype is None else as_dtype(dtype),
                           special_dtypes={k: as_dtype(v) for k, v in (special_dtypes or {}).items()},
                           low_zero=low_zero, defaulted=max_memory is None)
