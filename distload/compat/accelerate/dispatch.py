"""`load_checkpoint_and_dispatch` and `load_checkpoint_in_model` with accelerate's
meaning, and the single-process loading behind them (`dispatch_checkpoint`): fill a meta
model from a checkpoint following a device map, reading each tensor's bytes once, with
distload's reader and offload store.

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

Parameters tied to one another (one checkpoint tensor) with the same placement share one
Parameter, so ties survive; with different placements each gets its own copy. When the
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

import os
from collections.abc import Mapping

import torch
from torch import nn

from ...checkpoint import index_checkpoint
from ...checkpoint.quant import quant_scheme
from ...dtypes import cast_dtype, dtype_from_name, dtype_name
from ...errors import ConfigError, LoadError
from ...io import read_tensors
from ...io.reader import DEFAULT_STAGING_BYTES
from ...log import logger
from ...meta import check_materialized, describe_model
from ...offload import OffloadStore, attach_streaming, default_offload_dir, ensure_entries
from ...plan.budget import format_bytes
from ...plan.build import match_params_to_keys
from .device_map import Device, as_dtype, infer_auto_device_map
from .placement import (DISK, HOST, RESIDENT, check_devices_present, device_for, module_devices,
                        normalize_device, placement, warn_once)

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
                                 strict: bool = False, *, max_batch_size: int | None = None,
                                 max_seq_len: int | None = None, workload: str = "any",
                                 stream_slots: int | None = None):
    """Load `checkpoint` (a directory, a ``.safetensors``/``.bin`` file or an
    ``*.index.json``) into `model` (on meta) following `device_map` — a dict from
    `infer_auto_device_map`, or ``"auto"`` (also ``"balanced"``, ``"sequential"``) to plan
    one here. Each parameter's bytes are read once, straight into its place. "cpu" entries
    live in host memory ("cpu" is the device without GPUs; with GPUs they are streamed to
    the first GPU to run), "disk" entries go to `offload_folder` (a `distload.offload`
    store, default ``~/.cache/distload/offload``) and are streamed in to run. Floating
    tensors take `dtype`, else the model's own parameter dtype (as accelerate does).

    accelerate's switches: `skip_keys` (output/input keys never moved between devices)
    and `force_hooks` (move inputs even on one device) work; `preload_module_classes` is
    what distload always does (an offloaded unit's weights are all fetched before it
    runs); `offload_buffers` is not implemented (buffers stay on the device: a warning,
    once); `offload_state_dict` is needless — no temporary state dict is built, and the
    load's peak host memory (the "cpu" weights plus the read staging) is logged instead.

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
    if offload_buffers:
        warn_once("offload_buffers", "offload_buffers=True is not implemented by distload: buffers "
                  "of offloaded modules stay on the device they run on")
    if preload_module_classes:
        warn_once("preload_module_classes", "preload_module_classes: distload already fetches all of "
                  "an offloaded unit's weights before it runs", level=20)
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, max_memory, no_split_module_classes, dtype=dtype,
                                           max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                           workload=workload)
    elif device_map is None:
        device_map = {"": "cpu"}
    dispatch_checkpoint(model, os.fspath(checkpoint), device_map,
                        dtype=None if dtype is None else dtype_name(as_dtype(dtype)), strict=strict,
                        offload_folder=None if offload_folder is None else os.fspath(offload_folder),
                        no_split_module_classes=no_split_module_classes, skip_keys=skip_keys,
                        force_hooks=force_hooks, offload_state_dict=bool(offload_state_dict),
                        stream_slots=stream_slots or getattr(device_map, "stream_slots", 0) or 2)
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
    (`keep_in_fp32_modules` stay float32 under float16, as accelerate). One difference:
    "disk" parameters become entries of the offload store in `offload_folder` *and* are
    streamed in when their unit runs (accelerate leaves them on meta until
    `dispatch_model`, which distload folds in here). No temporary state dict is built (see
    `load_checkpoint_and_dispatch` for `offload_state_dict`); `offload_8bit_bnb` and
    `broadcast_from_rank0` are not implemented (a warning, once each). Returns None.

    Example::

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        load_checkpoint_in_model(model, "ckpt/", device_map={"": "cpu"})
    """
    for name, value in (("offload_buffers", offload_buffers), ("offload_8bit_bnb", offload_8bit_bnb),
                        ("broadcast_from_rank0", broadcast_from_rank0)):
        if value:
            warn_once(name, f"{name}=True is not implemented by distload's load_checkpoint_in_model: ignored")
    if not full_state_dict:
        warn_once("full_state_dict", "full_state_dict=False: distload loads whole tensors only")
    fp32 = tuple(keep_in_fp32_modules or ()) if dtype is not None and as_dtype(dtype) == torch.float16 else ()
    dispatch_checkpoint(model, os.fspath(checkpoint), dict(device_map or {"": "cpu"}),
                        dtype=None if dtype is None else dtype_name(as_dtype(dtype)), strict=strict,
                        offload_folder=None if offload_folder is None else os.fspath(offload_folder),
                        stream_host=False, align=False, keep_in_fp32=fp32,
                        offload_state_dict=offload_state_dict,
                        stream_slots=getattr(device_map, "stream_slots", 0) or 2)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _in_fp32(pname: str, modules: tuple[str, ...]) -> bool:
    return any(pname == m or f"{m}." in pname for m in modules)   # accelerate's match


def dispatch_checkpoint(model: nn.Module, checkpoint: str, device_map: dict, *, dtype: str | None,
                        strict: bool = False, offload_folder: str | None = None,
                        no_split_module_classes=None, skip_keys=None, force_hooks: bool = False,
                        stream_host: bool = True, align: bool = True, keep_in_fp32: tuple = (),
                        offload_state_dict: bool = False, stream_slots: int = 2) -> None:
    """Fill `model`'s meta parameters from `checkpoint` as `device_map` says (see the module
    docstring). `dtype` (a name) casts floating tensors; None: the model's own dtypes.
    `stream_host`: with GPUs, "cpu" parameters are pinned and streamed to the first GPU
    (else resident in host memory); `align`: hooks move inputs to each mapped module's
    device (`skip_keys` excepted; on one device only with `force_hooks`); `stream_slots`:
    offloaded units held at once (2: prefetch)."""
    check_devices_present(device_map)       # before a byte is read
    index = index_checkpoint(checkpoint)
    _refuse_quantized(index)
    spec = describe_model(model, no_split_module_classes=no_split_module_classes)
    param_to_key, unexpected = match_params_to_keys(spec, index.tensors, strict=strict)
    if unexpected:
        logger.warning("ignoring %d unexpected checkpoint key(s): %s", len(unexpected), ", ".join(unexpected[:8]))
    gpus = sorted({d for d in map(normalize_device, device_map.values()) if isinstance(d, int)})
    main = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
    params = dict(model.named_parameters(remove_duplicate=False))

    place, target, entry_of = {}, {}, {}
    for pname, key in param_to_key.items():
        try:
            entry_of[pname], device = device_for(pname, device_map)
        except KeyError:
            raise LoadError(f"device_map gives no device for parameter {pname}: name it, or a module "
                            "holding it, in the map") from None
        place[pname] = placement(device, main, stream_host=stream_host)
        src = index.tensors[key].dtype
        # accelerate's rule: floating tensors take `dtype`, else the model's own dtype
        own = dtype_name(params[pname].dtype) if params[pname].is_floating_point() else src
        want = "float32" if keep_in_fp32 and _in_fp32(pname, keep_in_fp32) else (dtype or own)
        target[pname] = cast_dtype(src, want)

    # One tensor per (checkpoint key, placement, dtype); the key's bytes are read once.
    storage: dict[tuple, torch.Tensor] = {}
    for pname, key in param_to_key.items():
        kind, dev = place[pname]
        slot = (key, kind, str(dev), target[pname])
        if kind != DISK and slot not in storage:
            storage[slot] = torch.empty(index.tensors[key].shape, dtype=dtype_from_name(target[pname]),
                                        device=dev or "cpu", pin_memory=kind == HOST)
    if offload_state_dict:
        host = sum(t.numel() * t.element_size() for t in storage.values() if t.device.type == "cpu")
        warn_once("offload_state_dict", "offload_state_dict: distload builds no temporary state dict; "
                  f"this load's peak host memory is the weights placed on 'cpu' ({format_bytes(host)}) "
                  f"plus the read staging (at most {format_bytes(_READ_WORKERS * DEFAULT_STAGING_BYTES)})",
                  level=20)
    first: dict[str, torch.Tensor] = {}
    for slot, tensor in storage.items():
        first.setdefault(slot[0], tensor)
    _read(index, first)
    for slot, tensor in storage.items():
        if tensor is not first[slot[0]]:
            tensor.copy_(first[slot[0]])

    shared: dict[tuple, nn.Parameter] = {}
    source: dict[str, object] = {}
    for pname, key in param_to_key.items():
        kind, dev = place[pname]
        slot = (key, kind, str(dev), target[pname])
        owner, attr = _owner(model, pname)
        if kind == RESIDENT:
            if slot not in shared:
                shared[slot] = nn.Parameter(storage[slot], requires_grad=params[pname].requires_grad)
            owner._parameters[attr] = shared[slot]
        elif kind == HOST:
            source[pname] = storage[slot]
    disk = [p for p in param_to_key if place[p][0] == DISK]
    if disk:
        source.update(_disk_entries(index, {p: param_to_key[p] for p in disk}, target, offload_folder))
    _move_buffers(model, device_map, main, index, stream_host)
    if source:
        _stream(model, spec, source, entry_of, main, stream_slots)
    if align:
        _align_devices(model, device_map, main, skip_keys=skip_keys, force=force_hooks)
    check_materialized(model, streamed=source)


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


def _read(index, dests: dict[str, torch.Tensor]) -> None:
    read_tensors([index.tensors[k] for k in sorted(dests)], dests, workers=_READ_WORKERS)


def _disk_entries(index, keys: dict[str, str], target: dict[str, str], folder: str | None) -> dict:
    store = OffloadStore(folder or default_offload_dir())
    groups: dict[str | None, dict] = {}
    for pname, key in keys.items():
        meta = index.tensors[key]
        groups.setdefault(None if target[pname] == meta.dtype else target[pname], {})[pname] = meta
    entries = {}
    for cast, metas in sorted(groups.items(), key=lambda kv: str(kv[0])):
        made, _ = ensure_entries(store, metas, checkpoint=index.root, dtype=cast)
        entries.update(made)
    logger.info("%d parameter(s) on the disk tier in %s", len(entries), store.root)
    return entries


def _move_buffers(model: nn.Module, device_map: dict, main: torch.device, index, stream_host: bool) -> None:
    devices = module_devices(model, device_map)
    for mod_name, mod in model.named_modules():
        for name, buf in list(mod._buffers.items()):
            if buf is None:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            if mod_name not in devices:
                raise LoadError(f"device_map gives no device for buffer {full}")
            kind, dev = placement(devices[mod_name], main, stream_host=stream_host)
            dev = dev if kind == RESIDENT else main
            if buf.is_meta:
                if full not in index.tensors:
                    continue  # reported as left on meta
                meta = index.tensors[full]
                buf = torch.empty(meta.shape, dtype=buf.dtype, device="cpu")
                _read(index, {full: buf})
            mod._buffers[name] = buf.to(dev)


def _stream(model: nn.Module, spec, source: dict, entry_of: dict, main: torch.device, slots: int) -> None:
    unit_of = spec.unit_of()
    chosen = {max(entry_of[p], unit_of[p], key=len) for p in source}
    units = {u for u in chosen if not any(o != u and (o == "" or u.startswith(o + ".")) for o in chosen)}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    attach_streaming(model, sorted(units, key=order.__getitem__), source, main, prefetch=slots > 1,
                     max_resident=slots)


def _to(obj, device: torch.device, skip: frozenset = frozenset()):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to(o, device, skip) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device, skip) for o in obj)
    if isinstance(obj, dict):
        for k in list(obj):
            if k not in skip:
                obj[k] = _to(obj[k], device, skip)
        return obj
    return obj


def _align_devices(model: nn.Module, device_map: dict, main: torch.device, *, skip_keys=None,
                   force: bool = False) -> None:
    """With several compute devices (or `force`): inputs follow each mapped module to its
    device, and the model's outputs come back to its first input's device (accelerate's
    hooks); keys in `skip_keys` are never moved."""
    skip = frozenset([skip_keys] if isinstance(skip_keys, str) else skip_keys or ())
    compute = {}
    for key, dev in device_map.items():
        kind, d = placement(dev, main)
        compute[key] = d if kind == RESIDENT else main
    if len(set(compute.values())) < 2 and not force:
        return
    for key, dev in compute.items():
        if key:
            model.get_submodule(key).register_forward_pre_hook(
                lambda m, args, kwargs, dev=dev: (_to(args, dev, skip), _to(kwargs, dev, skip)), with_kwargs=True)
    state = {}

    def remember(m, args, kwargs):
        first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
        state["device"] = first.device if first is not None else main
        return _to(args, compute.get("", main), skip), _to(kwargs, compute.get("", main), skip)

    model.register_forward_pre_hook(remember, with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: _to(out, state.get("device", main), skip))
