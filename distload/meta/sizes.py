"""Facts of a (meta) model that need no memory: bytes under each module name, the
parameters that are one and the same tensor, the persistent buffers.

Example::

    sizes = module_sizes(meta_model, dtype=torch.bfloat16)
    find_tied_parameters(meta_model)      # [["lm_head.weight", "model.embed_tokens.weight"]]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["module_sizes", "find_tied_parameters", "persistent_buffers"]


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


def persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, buffer) of every buffer a state dict holds (persistent), under `module`."""
    for mod_name, mod in module.named_modules():
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{n}" if mod_name else n), b
