"""`load_checkpoint_and_dispatch` with accelerate's meaning, and the single-process
loading behind it (`dispatch_checkpoint`): fill a meta model from a checkpoint following a
device map, reading each tensor's bytes once, with distload's reader and offload store.

Under torchrun (``WORLD_SIZE > 1``), ``load_checkpoint_and_dispatch(model, path,
device_map="auto")`` is the distributed path: every rank calls it, rank 0 plans, each rank
reads only its own stage, and it returns this rank's `distload.Pipeline` (the stage is
``.module``; run it with ``.forward`` / ``.generate`` on every rank) — a single
`nn.Module` cannot span processes. That path builds distload's own split-tolerant model
of the checkpoint's architecture (`distload.models`), so `model` only has to be on meta.

Placements (per parameter, from the longest device-map key that prefixes its name):

* a GPU index: resident on that GPU;
* ``"cpu"``: resident in host memory without GPUs; with GPUs, pinned host memory streamed
  to the first GPU of the map around each use (`distload.offload.attach_streaming`);
* ``"disk"``: an entry of the offload store (`distload.offload`), streamed in likewise.

Parameters tied to one another (one checkpoint tensor) with the same placement share one
Parameter, so ties survive; with different placements each gets its own copy. When the
map names several compute devices, inputs are moved to each module's device before it
runs and the model's outputs back to where its inputs were.

Example::

    dispatch_checkpoint(model, "ckpt/", {"": "cpu"}, dtype=None, strict=False)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from ...checkpoint import index_checkpoint
from ...dtypes import cast_dtype, dtype_from_name, dtype_name
from ...errors import LoadError
from ...io import read_tensors
from ...log import logger
from ...meta import check_materialized, describe_model
from ...offload import OffloadStore, attach_streaming, default_offload_dir, ensure_entries
from ...plan.build import match_params_to_keys
from .device_map import Device, as_dtype, infer_auto_device_map

__all__ = ["load_checkpoint_and_dispatch", "dispatch_checkpoint", "device_for"]

_AUTO = ("auto", "balanced", "balanced_low_0", "sequential")

RESIDENT, HOST, DISK = "resident", "host", "disk"


def load_checkpoint_and_dispatch(model: nn.Module, checkpoint: str | os.PathLike,
                                 device_map: Mapping[str, Device] | str | None = None,
                                 max_memory: Mapping | None = None, no_split_module_classes=None,
                                 offload_folder: str | os.PathLike | None = None,
                                 offload_buffers: bool = False, dtype=None,
                                 offload_state_dict: bool | None = None, skip_keys=None,
                                 preload_module_classes=None, force_hooks: bool = False,
                                 strict: bool = False, *, max_batch_size: int | None = None,
                                 max_seq_len: int | None = None):
    """Load `checkpoint` (a directory, a ``.safetensors``/``.bin`` file or an
    ``*.index.json``) into `model` (on meta) following `device_map` — a dict from
    `infer_auto_device_map`, or ``"auto"`` (also ``"balanced"``, ``"sequential"``) to plan
    one here. Each parameter's bytes are read once, straight into its place. "cpu" entries
    live in host memory ("cpu" is the device without GPUs; with GPUs they are streamed to
    the first GPU to run), "disk" entries go to `offload_folder` (a `distload.offload`
    store, default ``~/.cache/distload/offload``) and are streamed in to run. Floating
    tensors take `dtype`, else the model's own parameter dtype (as accelerate does).

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
                    max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    ignored = {"offload_state_dict": offload_state_dict, "skip_keys": skip_keys,
               "preload_module_classes": preload_module_classes, "force_hooks": force_hooks or None,
               "offload_buffers": offload_buffers or None}
    for name, value in ignored.items():
        if value is not None:
            logger.debug("load_checkpoint_and_dispatch: %s is accepted for compatibility and ignored", name)
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, max_memory, no_split_module_classes, dtype=dtype,
                                           max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    elif device_map is None:
        device_map = {"": "cpu"}
    dispatch_checkpoint(model, os.fspath(checkpoint), dict(device_map),
                        dtype=None if dtype is None else dtype_name(as_dtype(dtype)), strict=strict,
                        offload_folder=None if offload_folder is None else os.fspath(offload_folder),
                        no_split_module_classes=no_split_module_classes)
    model.hf_device_map = dict(device_map)
    return model


def device_for(name: str, device_map: Mapping[str, int | str]) -> tuple[str, int | str]:
    """(the device-map key, its device) for tensor or module `name`: the longest key that
    is `name` or a dotted prefix of it (``""`` matches everything). KeyError if none."""
    best = None
    for key in device_map:
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    if best is None:
        raise KeyError(name)
    return best, device_map[best]


def _normalize(device) -> int | str | torch.device:
    if isinstance(device, torch.device):
        return device.index if device.type == "cuda" and device.index is not None else device
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return device


def _placement(device, main: torch.device) -> tuple[str, torch.device | None]:
    device = _normalize(device)
    if isinstance(device, int):
        return RESIDENT, torch.device("cuda", device)
    if device == "cpu":
        return (HOST, None) if main.type == "cuda" else (RESIDENT, torch.device("cpu"))
    if device == "disk":
        return DISK, None
    return RESIDENT, torch.device(device)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def dispatch_checkpoint(model: nn.Module, checkpoint: str, device_map: dict, *, dtype: str | None,
                        strict: bool = False, offload_folder: str | None = None,
                        no_split_module_classes=None) -> None:
    """Fill `model`'s meta parameters from `checkpoint` as `device_map` says (see the module
    docstring). `dtype` (a name) casts floating tensors; None: the model's own dtypes."""
    index = index_checkpoint(checkpoint)
    spec = describe_model(model, no_split_module_classes=no_split_module_classes)
    param_to_key, unexpected = match_params_to_keys(spec, index.tensors, strict=strict)
    if unexpected:
        logger.warning("ignoring %d unexpected checkpoint key(s): %s", len(unexpected), ", ".join(unexpected[:8]))
    gpus = sorted({d for d in map(_normalize, device_map.values()) if isinstance(d, int)})
    main = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
    params = dict(model.named_parameters(remove_duplicate=False))

    place, target, entry_of = {}, {}, {}
    for pname, key in param_to_key.items():
        try:
            entry_of[pname], device = device_for(pname, device_map)
        except KeyError:
            raise LoadError(f"device_map places no module holding {pname}") from None
        place[pname] = _placement(device, main)
        src = index.tensors[key].dtype
        # accelerate's rule: floating tensors take `dtype`, else the model's own dtype
        own = dtype_name(params[pname].dtype) if params[pname].is_floating_point() else src
        target[pname] = cast_dtype(src, dtype or own)

    # One tensor per (checkpoint key, placement, dtype); the key's bytes are read once.
    storage: dict[tuple, torch.Tensor] = {}
    for pname, key in param_to_key.items():
        kind, dev = place[pname]
        slot = (key, kind, str(dev), target[pname])
        if kind != DISK and slot not in storage:
            storage[slot] = torch.empty(index.tensors[key].shape, dtype=dtype_from_name(target[pname]),
                                        device=dev or "cpu", pin_memory=kind == HOST)
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
    _move_buffers(model, device_map, main, index)
    if source:
        _stream(model, spec, source, entry_of, main)
    _align_devices(model, device_map, main)
    check_materialized(model, streamed=source)


def _read(index, dests: dict[str, torch.Tensor]) -> None:
    read_tensors([index.tensors[k] for k in sorted(dests)], dests)


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


def _move_buffers(model: nn.Module, device_map: dict, main: torch.device, index) -> None:
    for mod_name, mod in model.named_modules():
        for name, buf in list(mod._buffers.items()):
            if buf is None:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            kind, dev = _placement(device_for(full, device_map)[1], main)
            dev = dev if kind == RESIDENT else main
            if buf.is_meta:
                if full not in index.tensors:
                    continue  # reported as left on meta
                meta = index.tensors[full]
                buf = torch.empty(meta.shape, dtype=buf.dtype, device="cpu")
                _read(index, {full: buf})
            mod._buffers[name] = buf.to(dev)


def _stream(model: nn.Module, spec, source: dict, entry_of: dict, main: torch.device) -> None:
    unit_of = spec.unit_of()
    chosen = {max(entry_of[p], unit_of[p], key=len) for p in source}
    units = {u for u in chosen if not any(o != u and (o == "" or u.startswith(o + ".")) for o in chosen)}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    attach_streaming(model, sorted(units, key=order.__getitem__), source, main)


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to(o, device) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = _to(obj[k], device)
        return obj
    return obj


def _align_devices(model: nn.Module, device_map: dict, main: torch.device) -> None:
    """With several compute devices: inputs follow each mapped module to its device, and
    the model's outputs come back to its first input's device (accelerate's hooks)."""
    compute = {}
    for key, dev in device_map.items():
        kind, d = _placement(dev, main)
        compute[key] = d if kind == RESIDENT else main
    if len(set(compute.values())) < 2:
        return
    for key, dev in compute.items():
        if key:
            model.get_submodule(key).register_forward_pre_hook(
                lambda m, args, kwargs, dev=dev: (_to(args, dev), _to(kwargs, dev)), with_kwargs=True)
    state = {}

    def remember(m, args, kwargs):
        first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
        state["device"] = first.device if first is not None else main
        return _to(args, compute.get("", main)), _to(kwargs, compute.get("", main))

    model.register_forward_pre_hook(remember, with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: _to(out, state.get("device", main)))
