"""`load_checkpoint_and_dispatch` and `load_checkpoint_in_model` with accelerate's
meaning, and the translation behind them (`dispatch_checkpoint`): a device map becomes a
world-of-one `LoadPlan` (`distload.plan.sequential.single_process_plan`) that
`distload.loader.load_stage` runs — the one loading path of `distload.load`, with its
sources (a path or a hub id), reader, tiers, offload store, progress and errors. Each
tensor's bytes are read once, straight into their place.

Under torchrun (``WORLD_SIZE > 1``), ``load_checkpoint_and_dispatch(model, path,
device_map="auto")`` is the distributed path: every rank calls it, rank 0 plans, each rank
reads only its own stage, and it returns this rank's `distload.Pipeline` (the stage is
``.module``; run it with ``.forward`` / ``.generate`` on every rank) — a single
`nn.Module` cannot span processes. That path builds distload's own split-tolerant model
of the checkpoint's architecture (`distload.models`), so `model` only has to be on meta.

Placements (per parameter, from the longest device-map key that prefixes its name; a
parameter no key covers is an error naming it; buffers follow their module, which takes
its parent's device when the map does not name it — see `placement.py`):

* a GPU index: resident on that GPU;
* ``"cpu"``: resident in host memory without GPUs; with GPUs, pinned host memory streamed
  to the first GPU of the map around each use (`distload.offload.attach_streaming`);
* ``"disk"``: an entry of the offload store (`distload.offload`), streamed in likewise.

Parameters tied to one another (one checkpoint tensor) share one Parameter on the most
resident of their placements, so ties survive; on two different devices each device gets
its own copy. Every persistent buffer the checkpoint holds takes its value, wherever it
was built (meta, or already on the CPU); parameters of the root module are resident on
their device (no unit streams them). When the
map names several compute devices, inputs are moved to each module's device before it
runs and the model's outputs back to where its inputs were.

Every device of the map must exist here: a GPU this machine lacks fails before a byte is
read, naming it. No temporary state dict is ever built — each tensor is read straight into
its place — so the load's peak host memory is the weights placed on "cpu" plus the read
staging (at most 32 MiB per reader thread), whatever `offload_state_dict` says.

Example::

    dispatch_checkpoint(model, "ckpt/", {"": "cpu"}, dtype=None, strict=False)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ...checkpoint.quant import quant_scheme
from ...dist import World
from ...checkpoint.dtypes import cast_dtype, dtype_from_name, dtype_name
from ...errors import ConfigError, LoadError
from ...io import DEFAULT_STAGING_BYTES, ReadOptions
from ...loader.fetch import fetch_node_files
from ...loader.stage import load_stage
from ...log import logger
from ...meta import ParamSpec, UnitSpec, describe_model, persistent_buffers
from ...plan.budget import format_bytes
from ...plan.build import match_params_to_keys
from ...plan.sequential import Placement, single_process_plan
from ...plan.types import Tier
from ...sources import open_source
from .device_map import Device, as_dtype, get_balanced_memory, infer_auto_device_map
from .buffers import offload_streamed_buffers, place_buffers
from .hooks import align_devices as _align_devices
from .placement import (DISK, HOST, RESIDENT, check_devices_present, device_for, normalize_device,
                        placement, warn_once)
from .precision import float32_dtypes, float32_rule
from .prefix import with_base_prefix
from .preload import blocked_by, preload_classes, preload_unit

__all__ = ["load_checkpoint_and_dispatch", "load_checkpoint_in_model", "dispatch_checkpoint", "device_for"]

_AUTO = ("auto", "balanced", "balanced_low_0", "sequential")
_READ_WORKERS = 2


def load_checkpoint_and_dispatch(model: nn.Module, checkpoint: str | os.PathLike,
                                 device_map: Mapping[str, Device] | str | None = None,
                                 max_memory: Mapping | None = None, no_split_module_classes=None,
                                 offload_folder: str | os.PathLike | None = None,
                                 offload_buffers: bool = False, dtype=None,
                                 offload_state_dict: bool | None = None, skip_keys=None,
                                 preload_module_classes=None, force_hooks: bool = False,
                                 strict: bool = False, full_state_dict: bool = True,
                                 broadcast_from_rank0: bool = False, *, max_batch_size: int | None = None,
                                 max_seq_len: int | None = None, workload: str = "any",
                                 stream_slots: int | None = None):
    """Load `checkpoint` (a directory, a ``.safetensors``/``.bin`` file or an
    ``*.index.json``) into `model` (on meta) following `device_map` — a dict from
    `infer_auto_device_map`, or a string to plan one here as accelerate does: ``"auto"``,
    ``"balanced"`` and ``"balanced_low_0"`` over `get_balanced_memory`'s budgets,
    ``"sequential"`` over `max_memory` itself. Each parameter's bytes are read once, straight into its place. "cpu" entries
    live in host memory ("cpu" is the device without GPUs; with GPUs they are streamed to
    the first GPU to run), "disk" entries go to `offload_folder` (a `distload.offload`
    store, default ``~/.cache/distload/offload``) and are streamed in to run. Floating
    tensors take `dtype`, else the model's own parameter dtype (as accelerate does), but
    the tensors the model class keeps in float32 (`precision.py`: transformers'
    ``_keep_in_fp32_modules_strict`` under bfloat16 and float16, ``_keep_in_fp32_modules``
    under float16, as its ``from_pretrained`` does; accelerate's own function ignores them).

    accelerate's switches: `skip_keys` (output/input keys never moved between devices)
    and `force_hooks` (move inputs even on one device) work; `preload_module_classes`:
    an offloaded module of one of those classes fetches its whole subtree's weights when
    its forward starts, released after (`preload.py`); `offload_buffers` keeps the
    buffers of offloaded modules in host memory, brought onto the device with their
    module's weights (`buffers.py`); `offload_state_dict` is needless — no temporary
    state dict is built, and the load's peak host memory (the "cpu" weights plus the
    read staging) is logged instead;
    `full_state_dict` and `broadcast_from_rank0` concern accelerate's sharded training
    (a warning, once, when not their defaults).

    `stream_slots` (distload's): offloaded units on the device at once — 2 prefetches the
    next while one runs, 1 does not; default: what the plan made room for (a map from
    distload's `infer_auto_device_map` says), else 2.

    Returns `model`, with ``model.hf_device_map`` set. Under torchrun with
    ``device_map="auto"``: this rank's `Pipeline` instead (see the module docstring).

    Example::

        model = load_checkpoint_and_dispatch(model, "ckpt/", device_map="auto")
        logits = model(input_ids).logits
    """
    if isinstance(device_map, str) and device_map not in _AUTO:
        raise ValueError(f"device_map {device_map!r}: use a dict or one of {', '.join(_AUTO)}")
    if device_map == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ...loader import load  # the distributed path: this rank's Pipeline

        return load(os.fspath(checkpoint), dtype=dtype, max_memory=max_memory, strict=strict,
                    offload_dir=None if offload_folder is None else os.fspath(offload_folder),
                    max_batch_size=max_batch_size, max_seq_len=max_seq_len, workload=workload)
    _sharded_switches(full_state_dict, broadcast_from_rank0)
    if isinstance(device_map, str):
        # what the model keeps in float32 under `dtype` is sized so (`precision.py`)
        special = float32_dtypes(model, None if dtype is None else dtype_name(as_dtype(dtype))) or None
        if device_map != "sequential" and max_batch_size is None and max_seq_len is None:
            max_memory = get_balanced_memory(model, max_memory, no_split_module_classes, dtype=dtype,
                                             special_dtypes=special, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory, no_split_module_classes, dtype=dtype,
                                           special_dtypes=special, offload_buffers=offload_buffers,
                                           max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                           workload=workload)
    elif device_map is None:
        device_map = {"": "cpu"}
    dispatch_checkpoint(model, os.fspath(checkpoint), device_map,
                        dtype=None if dtype is None else dtype_name(as_dtype(dtype)), strict=strict,
                        offload_folder=None if offload_folder is None else os.fspath(offload_folder),
                        no_split_module_classes=no_split_module_classes, skip_keys=skip_keys,
                        force_hooks=force_hooks, offload_state_dict=bool(offload_state_dict),
                        preload_module_classes=preload_module_classes,
                        stream_slots=stream_slots or getattr(device_map, "stream_slots", 0) or 2)
    if offload_buffers:
        offload_streamed_buffers(model)
    model.hf_device_map = dict(device_map)
    return model


def load_checkpoint_in_model(model: nn.Module, checkpoint: str | os.PathLike,
                             device_map: Mapping[str, Device] | None = None,
                             offload_folder: str | os.PathLike | None = None, dtype=None,
                             offload_state_dict: bool = False, offload_buffers: bool = False,
                             keep_in_fp32_modules=None, offload_8bit_bnb: bool = False,
                             strict: bool = False, full_state_dict: bool = True,
                             broadcast_from_rank0: bool = False) -> None:
    """accelerate's lower-level loader, same meaning: load `checkpoint` into `model` (on
    meta, or materialized) following `device_map` (None: everything on the CPU) without
    dispatching — parameters mapped to a GPU or "cpu" are materialized there (host memory,
    not streamed; no hooks move inputs between devices), `dtype` casts floating tensors
    (`keep_in_fp32_modules` stay float32 under float16, as accelerate, and what the model
    class declares float32, `precision.py`). One difference:
    "disk" parameters become entries of the offload store in `offload_folder` *and* are
    streamed in when their unit runs (accelerate leaves them on meta until
    `dispatch_model`, which distload folds in here). No temporary state dict is built (see
    `load_checkpoint_and_dispatch` for `offload_state_dict`; `offload_buffers` likewise
    streams the buffers of "disk" modules with them); `offload_8bit_bnb` is
    not implemented, `broadcast_from_rank0` / `full_state_dict=False` concern sharded
    training (a warning, once each). Returns None.

    Example::

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        load_checkpoint_in_model(model, "ckpt/", device_map={"": "cpu"})
    """
    if offload_8bit_bnb:
        warn_once("offload_8bit_bnb", "offload_8bit_bnb=True is not implemented by distload's "
                  "load_checkpoint_in_model: ignored")
    _sharded_switches(full_state_dict, broadcast_from_rank0)
    fp32 = tuple(keep_in_fp32_modules or ()) if dtype is not None and as_dtype(dtype) == torch.float16 else ()
    dispatch_checkpoint(model, os.fspath(checkpoint), dict(device_map or {"": "cpu"}),
                        dtype=None if dtype is None else dtype_name(as_dtype(dtype)), strict=strict,
                        offload_folder=None if offload_folder is None else os.fspath(offload_folder),
                        stream_host=False, align=False, keep_in_fp32=fp32,
                        offload_state_dict=offload_state_dict,
                        stream_slots=getattr(device_map, "stream_slots", 0) or 2)
    if offload_buffers:   # the "disk" modules' buffers stream with them
        offload_streamed_buffers(model)


def _sharded_switches(full_state_dict: bool, broadcast_from_rank0: bool) -> None:
    if not full_state_dict:
        warn_once("full_state_dict", "full_state_dict=False: distload loads whole tensors only (a "
                  "sharded state dict is accelerate's FSDP path); ignored")
    if broadcast_from_rank0:
        warn_once("broadcast_from_rank0", "broadcast_from_rank0=True: in one process there is no rank to "
                  "broadcast to; under torchrun each rank reads only its own stage; ignored")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def dispatch_checkpoint(model: nn.Module, checkpoint: str, device_map: dict, *, dtype: str | None,
                        strict: bool = False, offload_folder: str | None = None,
                        no_split_module_classes=None, skip_keys=None, force_hooks: bool = False,
                        stream_host: bool = True, align: bool = True, keep_in_fp32: tuple = (),
                        offload_state_dict: bool = False, stream_slots: int = 2,
                        cache_dir: str | None = None, preload_module_classes=None) -> None:
    """Fill `model` from `checkpoint` (a path or hub id: `distload.sources`) as `device_map`
    says (see the module docstring). `dtype` (a name) casts floating tensors; None: the
    model's own dtypes. `stream_host`: with GPUs, "cpu" parameters are pinned and streamed
    to the first GPU (else resident in host memory); `align`: hooks move inputs to each
    mapped module's device (`skip_keys` excepted; on one device only with `force_hooks`);
    `stream_slots`: offloaded units held at once (2: prefetch); `keep_in_fp32`: accelerate's
    `keep_in_fp32_modules` (with what the model declares: `precision.float32_rule`);
    `preload_module_classes`: see `preload.py`.

    The map becomes a world-of-one `LoadPlan` (`distload.plan.sequential`) that
    `distload.loader.load_stage` runs — the loading path of `distload.load`: its sources,
    reader, tiers, offload store, progress and errors. The persistent buffers the
    checkpoint holds are in the plan (`StagePlan.buffers`: their files are fetched and
    checked with the parameters') but read here, into the caller's modules, with the same
    reader."""
    check_devices_present(device_map)       # before a byte is read
    source = open_source(os.fspath(checkpoint), cache_dir=cache_dir)
    index = with_base_prefix(model, source.index())
    _refuse_quantized(index)
    keep = float32_rule(model, dtype, keep_in_fp32)
    spec = _with_root_params(model, describe_model(model, no_split_module_classes=no_split_module_classes))
    param_to_key, unused = match_params_to_keys(spec, index.tensors, strict=False)
    buffer_keys = {name for name, _ in persistent_buffers(model) if name in index.tensors}
    _unexpected(model, checkpoint, [k for k in unused if k not in buffer_keys], strict=strict)
    gpus = sorted({d for d in map(normalize_device, device_map.values()) if isinstance(d, int)})
    main = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
    params = dict(model.named_parameters(remove_duplicate=False))
    grads = {name: p.requires_grad for name, p in params.items()}
    placements, units = _placements(model, spec, param_to_key, index, device_map, main, params,
                                     dtype=dtype, stream_host=stream_host, keep=keep,
                                     preload=preload_classes(preload_module_classes))
    tensors, sizes = index.relative()
    # the buffers are in the plan too: their files are fetched (a hub id) and checked with the rest
    plan = single_process_plan(units, placements, tensors, source=source.identity(), format=index.format,
                               file_sizes=sizes, stream_slots=stream_slots, buffers=sorted(buffer_keys),
                               pinned=main.type == "cuda")
    if offload_state_dict:
        host = sum(tensors[p.key].numel * dtype_from_name(p.dtype).itemsize for p in placements
                   if p.tier == Tier.CPU or p.device == "cpu")
        staging = plan.stage(0).reserve.get("host_staging", 0)
        pinned = f" and the disk tier's pinned staging ({format_bytes(staging)})" if staging else ""
        warn_once("offload_state_dict", "offload_state_dict: distload builds no temporary state dict; "
                  f"this load's peak host memory is the weights placed on 'cpu' ({format_bytes(host)}){pinned} "
                  f"plus the read staging (at most {format_bytes(_READ_WORKERS * DEFAULT_STAGING_BYTES)})",
                  level=20)
    world = World(rank=0, world_size=1, local_rank=0, device=main, backend=None)
    fetch_node_files(world, source, plan)
    reader = source.reader(ReadOptions(workers=_READ_WORKERS))
    place_buffers(model, device_map, main, index, buffer_keys, dtype=dtype, stream_host=stream_host,
                  reader=reader, keep=keep)
    load_stage(plan, world, reader=reader, module=model, offload_dir=offload_folder, cache_dir=cache_dir)
    # buffers the load recomputed (a distload model's RoPE, on the load's device) go back
    # to their module's device
    place_buffers(model, device_map, main, index, set(), dtype=dtype, stream_host=stream_host)
    with torch.no_grad():
        for p in placements:   # a key tied across devices is read where its first user lives
            owner, attr = _owner(model, p.param)
            param = owner._parameters[attr]
            if p.device and not param.is_meta and param.device != torch.device(p.device):
                owner._parameters[attr] = nn.Parameter(param.to(p.device), requires_grad=False)
        for name, param in model.named_parameters(remove_duplicate=False):
            param.requires_grad_(grads.get(name, False) and param.is_floating_point())
    if align:
        _align_devices(model, device_map, main, skip_keys=skip_keys, force=force_hooks)


def _refuse_quantized(index) -> None:
    """This path reads plain tensors: a quantized checkpoint would fill parameters with
    undecoded values (its scales left as unexpected keys), so it is refused, naming how."""
    try:
        scheme = quant_scheme(index.config)
    except ValueError as e:
        raise ConfigError(f"{index.path('config.json')}: {e}") from None
    if scheme is not None:
        raise LoadError(f"{index.root}: a {scheme.method} checkpoint is decoded by distload.load "
                        "(or build_model + load_checkpoint_and_dispatch of a bfloat16 export); "
                        "this path reads plain tensors only")



def _placements(model: nn.Module, spec, param_to_key: dict, index, device_map: dict, main: torch.device,
                params: dict, *, dtype: str | None, stream_host: bool, keep: Callable[[str], bool],
                preload: frozenset[str] = frozenset()
                ) -> tuple[list[Placement], list[tuple[str, float]]]:
    """Each parameter's `Placement` under `device_map`, and the plan's units ((name, cost)
    in module order): the modules the map or `describe_model` names, whichever is deeper,
    or an offloaded module of a `preload` class holding them (`preload.py`), never one
    inside another (an offloaded unit streams as a whole). `keep(name)`: the parameter
    stays float32 (`precision.py`)."""
    modules = dict(model.named_modules())
    unit_of = spec.unit_of()
    chosen: dict[str, str] = {}
    kinds: dict[str, tuple] = {}
    entries: dict[str, str] = {}
    for pname in param_to_key:
        try:
            entry, device = device_for(pname, device_map)
        except KeyError:
            raise LoadError(f"device_map gives no device for parameter {pname}: name it, or a module "
                            "holding it, in the map") from None
        kind, dev = placement(device, main, stream_host=stream_host)
        if unit_of[pname] == "":   # the root's own parameters stay resident (no unit streams them)
            kind, dev = RESIDENT, (dev if kind == RESIDENT else main)
            chosen[pname] = ""
        else:
            chosen[pname] = max(entry if entry in modules else "", unit_of[pname], key=len)
        kinds[pname], entries[pname] = (kind, dev), entry
    if preload:
        blocked = blocked_by([p for p, (kind, _) in kinds.items() if kind == RESIDENT])
        streamed = [p for p, (kind, _) in kinds.items() if kind != RESIDENT]
        for pname in streamed:
            chosen[pname] = preload_unit(modules, chosen[pname], entries[pname], preload, blocked=blocked,
                                         root=True)
        if any(chosen[p] == "" for p in streamed):   # the model itself: one unit streams all (its forward)
            chosen.update(dict.fromkeys(streamed, ""))
    named = {u for u in chosen.values() if u}
    outer = {u: next((a for a in _ancestors(u) if a in named), u) for u in named}
    placements = []
    for pname, key in param_to_key.items():
        kind, dev = kinds[pname]
        src = index.tensors[key].dtype
        # accelerate's rule: floating tensors take `dtype`, else the model's own dtype
        own = dtype_name(params[pname].dtype) if params[pname].is_floating_point() else src
        want = "float32" if keep(pname) else (dtype or own)
        tier = {RESIDENT: Tier.DEVICE, HOST: Tier.CPU, DISK: Tier.DISK}[kind]
        placements.append(Placement(pname, key, outer.get(chosen[pname], ""), cast_dtype(src, want), tier,
                                    str(dev) if kind == RESIDENT else ""))
    cost = {u.name: u.cost for u in spec.units}
    order = {name: i for i, name in enumerate(modules)}
    names = sorted({p.unit for p in placements}, key=order.__getitem__)
    return placements, [(u, sum(c for n, c in cost.items() if n == u or n.startswith(u + ".")))
                        for u in names]


def _ancestors(name: str) -> list[str]:
    """The dotted prefixes of `name`, outermost first ("a", "a.b" for "a.b.c")."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _with_root_params(model: nn.Module, spec):
    """`spec` with the model's own parameters (registered on the root module, which
    `describe_model` leaves out of every unit) as one more unit, named ""."""
    own = tuple(ParamSpec(n, tuple(p.shape), dtype_name(p.dtype)) for n, p in model.named_parameters(recurse=False))
    return dataclasses.replace(spec, units=spec.units + (UnitSpec("", own, 0.0),)) if own else spec


def _unexpected(model: nn.Module, checkpoint: str, keys: list[str], *, strict: bool) -> None:
    """Checkpoint keys that name no parameter and no persistent buffer: an error with
    `strict`, else accelerate's warning."""
    if not keys:
        return
    message = (f"Some weights of the model checkpoint at {checkpoint} were not used when initializing "
               f"{type(model).__name__}: {keys}")
    if strict:
        raise LoadError(f"{message} (strict=True)")
    logger.warning("%s. This may or may not be an issue - make sure that the checkpoint does not have "
                   "unnecessary parameters, or that the model definition correctly corresponds to the "
                   "checkpoint.", message)
