"""accelerate's `offload_buffers=True`: the buffers of every offloaded (streamed) module
are kept off the execution device, in host memory (pinned on CUDA), and brought onto it
with their module's weights when it runs — by the same `Streamer`, so they are fetched,
prefetched and released with the weights and never counted twice.

Example::

    offload_streamed_buffers(model)   # after dispatch: streamer_of(model) now streams buffers too
"""

from __future__ import annotations

import torch
from torch import nn

from ...offload import Entry, attach_streaming, streamer_of

__all__ = ["offload_streamed_buffers"]


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
