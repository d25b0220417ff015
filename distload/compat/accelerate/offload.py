"""`dispatch_model`, `disk_offload` and `cpu_offload` with accelerate's meaning: place a
model whose weights are already in memory (built, or loaded by other means) as a device
map says, with distload's offload store and streaming.

A parameter on a GPU index (or on "cpu" without GPUs) moves there; one on "cpu" with GPUs
is kept in (pinned) host memory and streamed onto the main device around its module's
forward; one on "disk" is written once to a safetensors file under `offload_dir`
(atomically), becomes a zero-copy entry of the offload store there, and streams likewise.
Buffers follow their module (an offloaded module's run on the main device). Parameters
tied to one another stay one Parameter where they are resident.

Example::

    model = dispatch_model(model, {"linear1": "cpu", "linear2": "disk"}, offload_dir="off/")
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from ...checkpoint import index_checkpoint
from ...errors import LoadError
from ...offload import OffloadStore, attach_streaming, default_offload_dir, ensure_entries, streamer_of
from ...offload.stream import _ATTR as _STREAMER_ATTR
from .buffers import offload_streamed_buffers, place_buffers
from .dispatch import _ancestors, _owner
from .hooks import align_devices as _align_devices
from .placement import HOST, RESIDENT, check_devices_present, device_for, normalize_device, placement
from .preload import blocked_by, preload_classes, preload_unit

__all__ = ["dispatch_model", "disk_offload", "cpu_offload", "get_state_dict_offloaded_model"]


def dispatch_model(model: nn.Module, device_map: Mapping, main_device: torch.device | str | None = None,
                   state_dict: Mapping[str, torch.Tensor] | None = None,
                   offload_dir: str | os.PathLike | None = None, offload_index: Mapping | None = None,
                   offload_buffers: bool = False, skip_keys=None, preload_module_classes=None,
                   force_hooks: bool = False) -> nn.Module:
    """accelerate's `dispatch_model`: place `model` (its weights in memory; a parameter
    still on meta takes its value from `state_dict`) as `device_map` says — see the module
    doc. `main_device` runs the offloaded modules (default: the first GPU of the map, else
    the CPU); `skip_keys` / `force_hooks` as in `load_checkpoint_and_dispatch`.
    `offload_index` (accelerate's own offload-folder layout) is refused with a message;
    `offload_buffers` and `preload_module_classes` as in `load_checkpoint_and_dispatch`.
    Returns `model`, with ``model.hf_device_map`` set."""
    model = _dispatch(model, device_map, main_device, state_dict, offload_dir, offload_index, offload_buffers,
                      skip_keys, force_hooks, stream_cpu=False, preload=preload_classes(preload_module_classes))
    model.hf_device_map = dict(device_map)
    return model


def _dispatch(model: nn.Module, device_map: Mapping, main_device, state_dict, offload_dir, offload_index,
              offload_buffers: bool, skip_keys, force_hooks: bool, *, stream_cpu: bool,
              preload: frozenset[str] = frozenset(), from_root: bool = False) -> nn.Module:
    """`dispatch_model`'s work. `stream_cpu`: "cpu" parameters are kept in host memory and
    streamed even when the CPU runs them (`cpu_offload`'s meaning), not made resident.
    `preload`: class names whose offloaded modules stream as one unit (`preload.py`), found
    from each tensor's map key down, or from the model itself with `from_root` (as
    accelerate's `cpu_offload` and `disk_offload` attach their hooks)."""
    if offload_index is not None:
        raise LoadError("dispatch_model: offload_index (accelerate's .dat offload folder) is not a distload "
                        "offload store; load the checkpoint with load_checkpoint_and_dispatch instead")
    device_map = dict(device_map)
    check_devices_present(device_map)
    gpus = sorted({d for d in map(normalize_device, device_map.values()) if isinstance(d, int)})
    main = torch.device(main_device) if main_device is not None else (
        torch.device("cuda", gpus[0]) if gpus else torch.device("cpu"))
    values = dict(state_dict or {})
    streamed = _release_streamed(model)
    modules = dict(model.named_modules())
    resident: dict[int, nn.Parameter] = {}
    source: dict[str, torch.Tensor] = {}
    disk: dict[str, torch.Tensor] = {}
    units: dict[str, tuple[str, str]] = {}   # streamed tensor -> (its unit, where hooks start)
    kept: list[str] = []                     # resident tensors
    with torch.no_grad():
        for name, param in list(model.named_parameters(remove_duplicate=False)):
            try:
                entry, device = device_for(name, device_map)
            except KeyError:
                raise LoadError(f"device_map gives no device for parameter {name}: name it, or a module "
                                "holding it, in the map") from None
            owner, attr = _owner(model, name)
            value = values.get(name, streamed.get((id(owner), attr), param))
            if value.is_meta:
                raise LoadError(f"dispatch_model: {name} is on the meta device and not in state_dict: load "
                                "the checkpoint with load_checkpoint_and_dispatch")
            host = stream_cpu and normalize_device(device) == "cpu" and "." in name   # the root's own stay
            kind, dev = (HOST, None) if host else placement(device, main)
            if kind == RESIDENT:
                if id(param) not in resident:
                    resident[id(param)] = nn.Parameter(value.to(dev), requires_grad=param.requires_grad)
                owner._parameters[attr] = resident[id(param)]
                kept.append(name)
                continue
            # a module the map names streams whole; under the key "" each module its own (as
            # accelerate hooks every module with tensors), or a preloaded one (`preload.py`)
            unit = entry if entry and entry in modules else name.rpartition(".")[0]
            units[name] = (unit, "" if from_root else entry)
            if kind == HOST:
                source[name] = value.detach().to("cpu")
                source[name] = source[name].pin_memory() if main.type == "cuda" else source[name]
            else:
                disk[name] = value.detach().to("cpu").contiguous()
        by_id = {id(m): m for m in modules.values()}
        for (owner_id, attr), value in streamed.items():   # buffers a previous dispatch streamed
            if attr in by_id[owner_id]._buffers:
                by_id[owner_id]._buffers[attr] = value
    if disk:
        source.update(_disk_entries(disk, offload_dir))
    place_buffers(model, device_map, main, None, set(), dtype=None, stream_host=True)
    if source:
        if any(unit == "" for unit, _ in units.values()):
            raise LoadError("dispatch_model: parameters of the root module cannot be offloaded (no module "
                            "runs them); map them to a device")
        blocked = blocked_by(kept)
        chosen = {preload_unit(modules, unit, start, preload, blocked=blocked, root=True)
                  for unit, start in units.values()}
        # the model itself preloaded (its forward runs every module) is the one unit
        outer = [""] if "" in chosen else sorted(
            {next((a for a in _ancestors(u) if a in chosen), u) for u in chosen}, key=list(modules).index)
        attach_streaming(model, outer, source, main, prefetch=False, max_resident=1)
        if offload_buffers:
            offload_streamed_buffers(model)
        hook = _Detach(main, model)
        for holder in ("", *outer):   # accelerate's remove_hook_from_submodules visits the children
            modules[holder]._hf_hook = hook
    _align_devices(model, device_map, main, skip_keys=skip_keys, force=force_hooks)
    return model


class _Detach:
    """What accelerate's `remove_hook_from_module(model)` calls (`_hf_hook.detach_hook`):
    the streamed weights come back into host memory and the streaming hooks go, so a model
    dispatched here can be undone with accelerate's own call, as its hooks can."""

    def __init__(self, execution_device: torch.device, model: nn.Module) -> None:
        self.execution_device, self.model = execution_device, weakref.ref(model)

    def detach_hook(self, module: nn.Module) -> nn.Module:
        model = self.model()
        if model is None:
            return module
        with torch.no_grad():   # the first detached unit restores them all
            for (owner_id, attr), value in _release_streamed(model).items():
                owner = next(m for m in model.modules() if id(m) == owner_id)
                if attr in owner._parameters:
                    owner._parameters[attr] = nn.Parameter(value.to("cpu"), requires_grad=False)
                else:
                    owner._buffers[attr] = value.to("cpu")
        return module


def _release_streamed(model: nn.Module) -> dict:
    """A model dispatched before: its streaming hooks go, and the weights they streamed
    (on meta between uses) are returned, (id(owner), attr) -> tensor, to be placed anew."""
    streamer = streamer_of(model)
    if streamer is None:
        return {}
    out = {}
    for unit in streamer.units:
        for owner, attr, _, group in unit.slots:
            src = unit.sources[group]
            out[(id(owner), attr)] = src if isinstance(src, torch.Tensor) else src.read()
    streamer.close()
    vars(model).pop(_STREAMER_ATTR, None)   # undone: streamer_of(model) is None again
    return out


def get_state_dict_offloaded_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """accelerate's `get_state_dict_offloaded_model`: `model.state_dict()` on the CPU, each
    offloaded (streamed) tensor taken from where it waits — host memory, or read from its
    offload-store entry — without running the model or moving its placeholders."""
    values: dict[tuple[int, str], torch.Tensor] = {}
    streamer = streamer_of(model)
    for unit in streamer.units if streamer is not None else ():
        for owner, attr, _, group in unit.slots:
            src = unit.sources[group]
            values[(id(owner), attr)] = src if isinstance(src, torch.Tensor) else src.read()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner, attr = _owner(model, name)
        value = values.get((id(owner), attr), tensor)
        out[name] = value.detach().to("cpu")
    return out


def _disk_entries(tensors: dict[str, torch.Tensor], offload_dir) -> dict:
    """Offload-store entries for in-memory `tensors`: written once to a safetensors file
    under the store (hidden until complete), referenced by zero-copy entries."""
    store = OffloadStore(offload_dir or default_offload_dir())
    folder = os.path.join(store.root, "dispatched")
    os.makedirs(folder, exist_ok=True)
    name = f"{uuid.uuid4().hex}.safetensors"
    tmp = os.path.join(folder, f".{name}.tmp")
    unique: dict[int, str] = {}
    payload = {}
    for key, t in tensors.items():   # a tied tensor is stored once
        if id(t) not in unique:
            unique[id(t)] = key
            payload[key] = t
    save_file(payload, tmp)
    os.replace(tmp, os.path.join(folder, name))
    index = index_checkpoint(os.path.join(folder, name))
    entries, _ = ensure_entries(store, {k: index.tensors[k] for k in payload}, checkpoint=index.root)
    return {k: entries[unique[id(t)]] for k, t in tensors.items()}


def disk_offload(model: nn.Module, offload_dir: str | os.PathLike, execution_device: torch.device | str | None = None,
                 offload_buffers: bool = False, preload_module_classes=None) -> nn.Module:
    """accelerate's `disk_offload`: every weight written to the offload store in
    `offload_dir`, streamed onto `execution_device` (default: the first GPU, else the CPU)
    around each top-level module's forward (the whole model's around its forward when its
    class is in `preload_module_classes`, see `preload.py`). Sets ``hf_device_map``."""
    device = _execution(execution_device)
    device_map = _top_level(model, "disk", device)
    model = _dispatch(model, device_map, device, None, offload_dir, None, offload_buffers, None, True,
                      stream_cpu=False, preload=preload_classes(preload_module_classes), from_root=True)
    model.hf_device_map = dict(device_map)
    return model


def cpu_offload(model: nn.Module, execution_device: torch.device | str | None = None,
                offload_buffers: bool = False, state_dict: Mapping[str, torch.Tensor] | None = None,
                preload_module_classes=None) -> nn.Module:
    """accelerate's `cpu_offload`: every weight kept in host memory (pinned on CUDA; the
    values of `state_dict` where given, else the model's own), each top-level module's
    weights brought onto `execution_device` (default: the first GPU, else the CPU) when it
    runs and released after; the model's own parameters live on `execution_device`, and
    buffers too unless `offload_buffers`. Outputs come back to the inputs' device. As in
    accelerate, no ``hf_device_map`` is set. `preload_module_classes`: a module of those
    classes (the model itself too) has its whole subtree's weights brought in when its
    forward starts (`preload.py`; a top-level module's are anyway)."""
    device = _execution(execution_device)
    return _dispatch(model, _top_level(model, "cpu", device), device, state_dict, None, None, offload_buffers,
                     None, True, stream_cpu=True, preload=preload_classes(preload_module_classes), from_root=True)


def _execution(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _top_level(model: nn.Module, where: str, device: torch.device) -> dict:
    """A map of `model`'s children on `where`, and its own parameters resident on the
    execution `device` (no module runs them but the model itself)."""
    device_map = {name: where for name, _ in model.named_children()}
    for name, _ in model.named_parameters(recurse=False):
        device_map[name] = device.index if device.type == "cuda" else str(device)
    return device_map or {"": where}
