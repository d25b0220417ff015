"""Building models without memory: `init_empty_weights` / `init_on_device` mean what
they mean in accelerate. Any process may call these; none touches files.

Nothing here outlives the block, and nothing is replaced that another library could
capture: parameters (and buffers) are moved by torch's own registration hooks, whose
handles are removed on exit; tensor factories follow a `torch.device` context; random
initialisation of meta tensors is skipped by a `TorchFunctionMode` popped on exit.
`torch.nn.init`, `nn.Module` and `torch.*` are never reassigned (transformers copies
`torch.nn.init` functions when its modeling modules are first imported, possibly inside
the block: it must copy the real ones).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.overrides import TorchFunctionMode

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

    Blocks nest (the innermost device wins) and undo everything on exit, also when the
    body raises. The registration hooks are torch's global ones, so a model built in
    another thread meanwhile is affected too (as with accelerate's patch).

    Example::

        with init_on_device("cuda:0"):
            layer = nn.Linear(4096, 4096)     # allocated on the GPU directly
    """
    device = torch.device(device)
    me = object()

    def move_parameter(module: nn.Module, name: str, param: nn.Parameter | None):
        # Already there: keep the very object, so `head.weight = embed.weight` stays tied.
        if param is None or _on_device(param, device) or _ACTIVE["param"][-1] is not me:
            return None
        kwargs = dict(param.__dict__)
        kwargs["requires_grad"] = param.requires_grad
        hf_flag = kwargs.pop("_is_hf_initialized", None)  # not a constructor argument
        moved = type(param)(param.to(device), **kwargs)
        if hf_flag is not None:
            moved._is_hf_initialized = hf_flag
        return moved

    def move_buffer(module: nn.Module, name: str, tensor: torch.Tensor | None):
        if tensor is None or _on_device(tensor, device) or _ACTIVE["buffer"][-1] is not me:
            return None
        return tensor.to(device)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_active("param", me))
        stack.callback(_module.register_module_parameter_registration_hook(move_parameter).remove)
        if include_buffers:
            stack.enter_context(_active("buffer", me))
            stack.callback(_module.register_module_buffer_registration_hook(move_buffer).remove)
            # Buffers made by factories (torch.ones(...)) start on `device` too, so nothing
            # is allocated elsewhere first.
            stack.enter_context(torch.device(device))
        if device.type == "meta":
            stack.enter_context(_SkipMetaInit())
        yield


# The blocks open now, innermost last: only the innermost moves a tensor (torch runs
# every registration hook, outermost first).
_ACTIVE: dict[str, list[object]] = {"param": [], "buffer": []}


@contextlib.contextmanager
def _active(kind: str, token: object) -> Iterator[None]:
    _ACTIVE[kind].append(token)
    try:
        yield
    finally:
        _ACTIVE[kind].remove(token)


# Random init of meta tensors is pointless, and its first call imports torch's
# decomposition stack (~1 s per process): such calls return their meta tensor unchanged,
# as transformers' no_init_weights skips them. Only calls that change values, never a
# shape or a flag, and only when the tensor they fill is on meta.
_VALUE_METHODS = frozenset(
    getattr(torch.Tensor, n) for n in (
        "normal_", "uniform_", "fill_", "zero_", "random_", "exponential_", "bernoulli_",
        "log_normal_", "cauchy_", "geometric_", "erfinv_", "clamp_", "mul_", "add_", "sub_",
        "div_", "copy_", "masked_fill_", "fill_diagonal_", "exp_", "abs_", "sqrt_", "neg_"))
_INIT_FUNCTIONS = frozenset(getattr(nn.init, n) for n in dir(nn.init)
                            if n.endswith("_") and not n.startswith("_"))


class _SkipMetaInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_METHODS or func in _INIT_FUNCTIONS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def _on_device(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)
