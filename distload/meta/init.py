"""Building models without memory: `init_empty_weights` / `init_on_device` mean what
they mean in accelerate. Any process may call these; none touches files."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["init_empty_weights", "init_on_device"]


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Create every parameter registered inside the block on the meta device (no memory);
    buffers too if `include_buffers`.

    Example::

        with init_empty_weights():
            model = build_model(cfg)          # parameters on meta, buffers on cpu
    """
    with init_on_device(torch.device("meta"), include_buffers=include_buffers):
        yield


@contextlib.contextmanager
def init_on_device(device: torch.device | str, include_buffers: bool = True) -> Iterator[None]:
    """Create every parameter (and, if `include_buffers`, every buffer and tensor factory
    result) made inside the block on `device`.

    Works by patching `nn.Module.register_parameter` (and `register_buffer`) for the
    duration of the block; the originals come back in `finally`, also when the body
    raises, and blocks nest (the innermost device wins). The patch is process-wide, so do
    not build models in other threads meanwhile.

    Example::

        with init_on_device("cuda:0"):
            layer = nn.Linear(4096, 4096)     # allocated on the GPU directly
    """
    device = torch.device(device)
    old_register_parameter = nn.Module.register_parameter
    old_register_buffer = nn.Module.register_buffer

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        old_register_parameter(module, name, param)
        param = module._parameters.get(name)
        # Already there: keep the very object, so `head.weight = embed.weight` stays tied.
        if param is not None and not _on_device(param, device):
            kwargs = dict(param.__dict__)
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(param.to(device), **kwargs)

    def register_buffer(module: nn.Module, name: str, tensor: torch.Tensor | None,
                        persistent: bool = True) -> None:
        old_register_buffer(module, name, tensor, persistent=persistent)
        buf = module._buffers.get(name)
        if buf is not None and not _on_device(buf, device):
            module._buffers[name] = buf.to(device)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    if include_buffers:
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
    # Random init of meta tensors is pointless, and its first call imports torch's
    # compiler stack (~1 s per process): skip it, as transformers' no_init_weights does.
    skipped = {n: getattr(nn.init, n) for n in _INIT_FUNCTIONS} if device.type == "meta" else {}
    for name in skipped:
        setattr(nn.init, name, _skip_init)
    try:
        # Buffers made by factories (torch.ones(...)) start on `device` too, so nothing
        # is allocated elsewhere first.
        with torch.device(device) if include_buffers else contextlib.nullcontext():
            yield
    finally:
        nn.Module.register_parameter = old_register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = old_register_buffer  # type: ignore[method-assign]
        for name, fn in skipped.items():
            setattr(nn.init, name, fn)


_INIT_FUNCTIONS = tuple(n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_"))


def _skip_init(tensor, *args, **kwargs):
    return tensor


def _on_device(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)
