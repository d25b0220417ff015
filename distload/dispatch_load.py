"""Single-process loading behind `load_checkpoint_and_dispatch`: fill a meta model from a
checkpoint following a device map, reading each tensor's bytes once.

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

from collections.abc import Mapping

import torch
from torch import nn

from .checkpoint import index_checkpoint, load_bin_tensors
from .checkpoint.types import dtype_from_name, dtype_name
from .describe import describe_model
from .errors import LoadError
from .io.reader import read_tensors
from .log import logger
from .plan.build import match_params_to_keys

__all__ = ["dispatch_checkpoint", "device_for"]

RESIDENT, HOST, DISK = "resident", "host", "disk"


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
        floating = dtype_from_name(src).is_floating_point
        own = dtype_name(params[pname].dtype) if params[pname].is_floating_point() else src
        target[pname] = (dtype or own) if floating else src

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
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta and n not in source]
    if left:
        raise LoadError(f"{len(left)} tensor(s) left on the meta device after loading: {', '.join(left[:8])}")


def _read(index, dests: dict[str, torch.Tensor]) -> None:
    if index.format == "bin":
        by_file: dict[str, list[str]] = {}
        for key in dests:
            by_file.setdefault(index.tensors[key].file, []).append(key)
        for file, names in sorted(by_file.items()):
            for name, tensor in load_bin_tensors(file, names).items():
                dests[name].copy_(tensor)
        return
    read_tensors([index.tensors[k] for k in sorted(dests)], dests)


def _disk_entries(index, keys: dict[str, str], target: dict[str, str], folder: str | None) -> dict:
    from .offload import OffloadStore, default_offload_dir, ensure_entries

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
    from .offload import attach_streaming

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
