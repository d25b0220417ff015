"""A device map's buffers. `place_buffers`: each goes to its module's device, a
persistent one the checkpoint holds read into it (accelerate's `load_state_dict` meaning).
accelerate's `offload_buffers=True` (`offload_streamed_buffers`): the buffers of every
offloaded (streamed) module are kept off the execution device, in host memory (pinned on
CUDA), and brought onto it with their module's weights when it runs — by the same
`Streamer`, so they are fetched, prefetched and released with the weights and never
counted twice.

Example::

    place_buffers(model, device_map, torch.device("cpu"), index, {"norm.running_mean"}, dtype=None,
                  stream_host=True, reader=reader)
    offload_streamed_buffers(model)   # after dispatch: streamer_of(model) now streams buffers too
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...checkpoint.dtypes import cast_dtype, dtype_from_name, dtype_name
from ...errors import LoadError
from ...io import Reader
from ...offload import Entry, attach_streaming, streamer_of
from .placement import RESIDENT, module_devices, placement

__all__ = ["offload_streamed_buffers", "place_buffers"]


def offload_streamed_buffers(model: nn.Module) -> int:
    """Re-attach `model`'s streamer with every buffer of its units added to what it
    streams (weights keep their sources: host tensors or offload-store entries, nothing
    is read). Returns how many buffers are now streamed; 0 (nothing changed) when nothing
    is offloaded."""
    old = streamer_of(model)
    if old is None:
        return 0
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    source: dict[str, torch.Tensor | Entry] = {}
    for unit in old.units:
        for owner, attr, _, group in unit.slots:
            source[_join(names[id(owner)], attr)] = unit.sources[group]
    old.close()   # weights back on meta placeholders; buffers where they were
    cuda = old.device.type == "cuda"
    host: dict[int, torch.Tensor] = {}   # a buffer shared by two modules stays one tensor
    added = 0
    for unit in old.units:
        for name, buf in unit.module.named_buffers(prefix=unit.name, remove_duplicate=False):
            if buf is None or buf.is_meta or name in source:
                continue
            if id(buf) not in host:
                copy = buf.detach().to("cpu")
                host[id(buf)] = copy.pin_memory() if cuda else copy.clone()
            source[name] = host[id(buf)]
            added += 1
    new = attach_streaming(model, old.unit_names, source, old.device, prefetch=old.prefetch,
                           max_resident=old.max_resident)
    if old._report is not None:
        new.bind_report(old._report)
    return added


def _join(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def place_buffers(model: nn.Module, device_map: dict, main: torch.device, index, keys: set[str], *,
                  dtype: str | None, stream_host: bool, reader: Reader | None = None,
                  keep: Callable[[str], bool] | None = None) -> None:
    """Every buffer goes to its module's device (an offloaded module's to the device it
    runs on: buffers are not offloaded, as in accelerate by default); a persistent one the
    checkpoint holds (`keys`) takes the checkpoint's value wherever it was — on meta, or
    already materialised (a BatchNorm's statistics under `init_empty_weights()`) —, its
    dtype `dtype` if floating and given (float32 where `keep(name)`, `precision.py`), else
    its own (as `load_state_dict` keeps it); `reader` (the source's) reads them."""
    devices = module_devices(model, device_map)
    read: dict[str, torch.Tensor] = {}
    owners: dict[str, tuple[nn.Module, str, torch.device]] = {}
    for mod_name, mod in model.named_modules():
        for name, buf in list(mod._buffers.items()):
            if buf is None:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            if mod_name not in devices:
                raise LoadError(f"device_map gives no device for buffer {full}")
            kind, dev = placement(devices[mod_name], main, stream_host=stream_host)
            dev = dev if kind == RESIDENT else main
            if full in keys:
                meta = index.tensors[full]
                own = dtype_name(buf.dtype)
                if not buf.is_floating_point():
                    want = own
                else:
                    want = "float32" if keep is not None and keep(full) else cast_dtype(meta.dtype, dtype or own)
                read[full] = torch.empty(meta.shape, dtype=dtype_from_name(want), device="cpu")
                owners[full] = (mod, name, dev)
            elif not buf.is_meta:
                mod._buffers[name] = buf.to(dev)   # left on meta: check_materialized names it
    if read:
        relative, _ = index.relative()
        reader.read([relative[k] for k in sorted(read)], read)
    for full, (mod, name, dev) in owners.items():
        mod._buffers[name] = read[full].to(dev)
