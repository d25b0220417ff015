"""accelerate's device hooks, for a model a device map spreads over several devices:
inputs follow each mapped module to its device, outputs come back to where the inputs
were. Used by `load_checkpoint_and_dispatch` and `dispatch_model`.

Example::

    align_devices(model, {"model.layers.0": 0, "model.layers.1": 1}, torch.device("cuda", 0))
"""

from __future__ import annotations

import torch
from torch import nn

from .placement import RESIDENT, placement

__all__ = ["align_devices"]


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


def align_devices(model: nn.Module, device_map: dict, main: torch.device, *, skip_keys=None,
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
    modules = dict(model.named_modules())
    for key, dev in compute.items():
        if key and key in modules:   # a key naming a parameter or buffer: its module's hook moves it
            modules[key].register_forward_pre_hook(
                lambda m, args, kwargs, dev=dev: (_to(args, dev, skip), _to(kwargs, dev, skip)), with_kwargs=True)
    state = {}

    def remember(m, args, kwargs):
        first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
        state["device"] = first.device if first is not None else main
        return _to(args, compute.get("", main), skip), _to(kwargs, compute.get("", main), skip)

    model.register_forward_pre_hook(remember, with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: _to(out, state.get("device", main), skip))
