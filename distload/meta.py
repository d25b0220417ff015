"""Building models without memory, measuring them, and materializing them later.

`init_empty_weights` / `init_on_device` mean what they mean in accelerate; the rest are
the facts the planner needs from a meta model (sizes, tied groups) and the last step of a
load (`materialize`). Any process may call these; none touches files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "init_empty_weights", "init_on_device", "module_sizes", "find_tied_parameters",
    "materialize",
]


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


def module_sizes(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of parameters and persistent buffers under every module name ("" is the
    whole model). A Parameter shared by several modules (tied embeddings) counts once in
    any module that holds it, however many names it has there. `dtype` replaces the dtype
    of floating-point tensors (the size a load with that dtype will have).

    Example::

        sizes = module_sizes(meta_model, dtype=torch.bfloat16)
        sizes[""], sizes["model.layers.0"]
    """
    sizes: dict[str, int] = {name: 0 for name, _ in model.named_modules()}
    seen: dict[str, set[int]] = {name: set() for name in sizes}
    for name, tensor in _named_tensors(model):
        nbytes = tensor.numel() * (
            dtype.itemsize if dtype is not None and tensor.is_floating_point()
            else tensor.element_size())
        parts = name.split(".")[:-1]
        for prefix in [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]:
            if id(tensor) not in seen[prefix]:
                seen[prefix].add(id(tensor))
                sizes[prefix] += nbytes
    return sizes


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # Every name of every parameter and persistent buffer (duplicates included).
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in mod._parameters.items():
            if p is not None:
                yield prefix + name, p
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                yield prefix + name, b


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one and the same Parameter object, each group
    sorted, the groups sorted; ``[]`` when nothing is tied.

    Example::

        find_tied_parameters(model)  # [["lm_head.weight", "model.embed_tokens.weight"]]
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return sorted(sorted(set(names)) for names in groups.values() if len(set(names)) > 1)


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
