"""The last step of building a model on meta: give it real storage, and check that nothing
was left behind on the meta device.

Example::

    materialize(model, "cuda:0")                 # storage for everything, ties kept
    model.load_state_dict(weights)
    check_materialized(model)                     # LoadError naming what is still on meta
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from ..errors import LoadError
from .init import _on_device

__all__ = ["materialize", "check_materialized", "init_buffers"]


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Give every meta parameter and buffer of `module` uninitialized storage on `device`
    (as `to_empty` does), move the others there, keep tied parameters tied, and then
    recompute non-persistent buffers with `init_buffers(device)` where a module has it.
    Returns `module` (changed in place); load its weights next.

    Example::

        with torch.device("meta"):
            model = build_model(cfg)
        materialize(model, "cuda:0")
        model.load_state_dict(weights)
    """
    device = torch.device(device)
    # id(old) -> (old, new): a shared tensor stays shared; holding `old` keeps its id unique.
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            if not t.is_meta and _on_device(t, device):
                new = t
            else:
                new = torch.empty_like(t, device=device) if t.is_meta else t.detach().to(device)
                if isinstance(t, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=t.requires_grad)
            done[id(t)] = (t, new)
        return done[id(t)][1]

    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[name] = convert(p)
            for name, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[name] = convert(b)
    _init_buffers(module, device)
    return module


def _init_buffers(module: nn.Module, device: torch.device) -> None:
    # The outermost modules that know how; they recompute their children's buffers.
    init = getattr(module, "init_buffers", None)
    if callable(init):
        init(device)
        return
    for child in module.children():
        _init_buffers(child, device)


def init_buffers(module: nn.Module, device: torch.device | str) -> None:
    """Recompute the non-persistent buffers (RoPE frequencies) of `module` on `device`:
    the outermost modules that define `init_buffers(device)` do it for their children."""
    _init_buffers(module, torch.device(device))


def check_materialized(module: nn.Module, *, streamed: Collection[str] = ()) -> None:
    """Raise `LoadError` naming every parameter or buffer of `module` still on the meta
    device, but those in `streamed` (offloaded tensors, on meta between their uses)."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.is_meta and n not in streamed]
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        raise LoadError(f"{len(left)} tensor(s) left on the meta device after loading: {shown}")
