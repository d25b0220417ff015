"""accelerate's own device map: the greedy fill of `accelerate.infer_auto_device_map`
(accelerate 1.16, Apache-2.0), ported so that one process gets the map its users predict
— the first GPU filled first, then the next, then "cpu", then "disk", the main devices
(the first GPU and "cpu") keeping room for the largest layer, tied parameters kept
together, a module split into its children when it does not fit, `fallback_allocation`'s
search for a smaller module when none fits. Pure over the module tree (a meta model needs
no memory); `infer_auto_device_map` checks the result against distload's budgets and plans
itself where it breaks one.

Example::

    result = greedy_device_map(model, {0: 200, 1: 200})
    result.device_map        # OrderedDict([('linear1', 0), ('batchnorm', 1), ('linear2', 1)])
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ...log import logger
from ...meta import find_tied_parameters

__all__ = ["GreedyMap", "greedy_device_map", "module_sizes_like_accelerate", "clean_device_map", "balanced_memory"]


@dataclass
class GreedyMap:
    """`greedy_device_map`'s answer: the uncleaned map, the bytes it put on each device,
    the buffer bytes of modules on each device, and, per device that got nothing, the
    bytes its first module would have needed."""

    device_map: OrderedDict
    used: dict = field(default_factory=dict)
    buffer_bytes: dict = field(default_factory=dict)
    minimum: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)


def module_sizes_like_accelerate(model: nn.Module, dtype: torch.dtype | None = None,
                                 special_dtypes: Mapping[str, torch.dtype] | None = None,
                                 buffers_only: bool = False) -> dict[str, int]:
    """Bytes of every module and tensor name (prefixes included, "" the whole model) as
    accelerate counts them: parameters and every buffer, floating tensors at `dtype` when
    it is smaller, `special_dtypes` per tensor."""
    sizes: dict[str, int] = defaultdict(int)
    tensors = model.named_buffers() if buffers_only else [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if special_dtypes and name in special_dtypes:
            size = t.numel() * special_dtypes[name].itemsize
        elif dtype is None or not (t.is_floating_point() or t.is_complex()):
            size = t.numel() * t.element_size()
        else:
            size = t.numel() * min(dtype.itemsize, t.element_size())
        parts = name.split(".")
        for i in range(len(parts) + 1):
            sizes[".".join(parts[:i])] += size
    return sizes


def _children(module) -> list:
    return list(module.named_children()) if isinstance(module, nn.Module) else []


def _max_layer(modules: list, sizes: dict, no_split: list[str]) -> tuple[int, list[str]]:
    best, names = 0, []
    todo = list(modules)
    while todo:
        name, module = todo.pop(0)
        kids = _children(module)
        if not kids or type(module).__name__ in no_split:
            if sizes[name] > best:
                best, names = sizes[name], [name]
            elif sizes[name] == best:
                names.append(name)
        else:
            todo = [(f"{name}.{n}", m) for n, m in kids] + todo
    return best, names


def _ties_outside(name: str, tied: list[list[str]]) -> list[str]:
    groups = [g for g in tied if any(name + "." in k + "." for k in g) and not all(name + "." in k + "." for k in g)]
    return [p for g in groups for p in g if name + "." not in p + "."]


def _with_ties(tied_params: list[str], size: int, sizes: dict, modules: list) -> tuple[int, list, list]:
    names, mods = [], []
    for p in tied_params:
        i = next(i for i, (n, _) in enumerate(modules) if p == n or p.startswith(n + "."))
        names.append(modules[i][0])
        mods.append(modules[i][1])
    total = size + sum(sizes[n] - sizes[p] for p, n in zip(tied_params, names))
    return total, names, mods


def _split(name: str, module) -> list:
    return [(f"{name}.{n}", v) for n, v in list(module.named_parameters(recurse=False)) + _children(module)]


def _fallback(modules: list, sizes: dict, limit: int, no_split: list[str], tied: list[list[str]]):
    """A module (breadth first among `modules`) within `limit` bytes with its ties, taken
    out of `modules` (its parents split): (name, module, remaining) or (None, None, modules)."""
    todo = list(modules)
    found = None
    while todo:
        name, module = todo.pop(0)
        size, _, _ = _with_ties(_ties_outside(name, tied), sizes[name], sizes, todo)
        if size <= limit:
            found = name
            break
        kids = [] if isinstance(module, torch.Tensor) else _children(module)
        if kids and type(module).__name__ not in no_split:
            todo = _split(name, module) + todo
    if found is None:
        return None, None, modules
    current = [n for n, _ in modules]
    for i, ch in enumerate(found):
        parent = found[:i]
        if ch == "." and parent in current:
            k = current.index(parent)
            modules = modules[:k] + _split(parent, modules[k][1]) + modules[k + 1:]
            current = [n for n, _ in modules]
    k = current.index(found)
    name, module = modules.pop(k)
    return name, module, modules


def greedy_device_map(model: nn.Module, max_memory: Mapping, no_split_module_classes=None, *,
                      dtype: torch.dtype | None = None, special_dtypes: Mapping | None = None,
                      offload_buffers: bool = False, fallback_allocation: bool = False,
                      verbose: bool = False) -> GreedyMap:
    """accelerate's `infer_auto_device_map` fill over `max_memory` (bytes per device: GPU
    indices, "cpu", "disk"; accelerate's order: the GPUs by index, then "cpu", then "disk",
    always last and unlimited). See the module doc."""
    no_split = [no_split_module_classes] if isinstance(no_split_module_classes, str) else \
        list(no_split_module_classes or [])
    gpus_keys = sorted(k for k in max_memory if isinstance(k, int))
    devices = gpus_keys + [k for k in ("mps", "cpu", "disk") if k in max_memory]
    if "disk" not in devices:
        devices.append("disk")
    gpus = [d for d in devices if d not in ("cpu", "disk")]
    main = ["mps"] if "mps" in gpus else ([gpus[0], "cpu"] if gpus else ["cpu"])
    sizes = module_sizes_like_accelerate(model, dtype, special_dtypes)
    tied = find_tied_parameters(model)
    todo = list(model.named_parameters(recurse=False)) + list(model.named_children()) + \
        list(model.named_buffers(recurse=False))
    device_map: OrderedDict = OrderedDict()
    current = 0
    used = {d: 0 for d in devices}
    buffers: dict = {}
    minimum: dict = {}
    say = logger.info if verbose else (lambda *a, **k: None)
    max_size, max_names = _max_layer(todo, sizes, no_split)
    while todo:
        name, module = todo.pop(0)
        max_names = [n for n in max_names if n != name and not n.startswith(name + ".")]
        if not max_names:
            max_size, max_names = _max_layer([(n, m) for n, m in todo if isinstance(m, nn.Module)], sizes, no_split)
        size = sizes[name]
        tied_params = _ties_outside(name, tied)
        device = devices[current]
        limit = max_memory[device] if device != "disk" else None
        reserved = 0
        if device in main:
            limit, reserved = limit - max_size, max_size
        with_ties, tied_names, tied_mods = _with_ties(tied_params, size, sizes, todo)
        if limit is None or used[device] + with_ties <= limit:
            say("putting %s (%d bytes with ties) on %s", name, with_ties, device)
            used[device] += with_ties
            device_map[name] = device
            for tname in tied_names:
                k = next((i for i, (n, _) in enumerate(todo) if n == tname), None)
                if k is not None:
                    todo.pop(k)
                device_map[tname] = device
            if not offload_buffers and isinstance(module, nn.Module):
                own = module_sizes_like_accelerate(module, dtype, special_dtypes, buffers_only=True).get("", 0)
                buffers[device] = buffers.get(device, 0) + own
            continue
        if tied_params and used[device] + size <= limit:
            split = False
            for tname, tmod in zip(tied_names, tied_mods):
                if not _children(tmod) or type(tmod).__name__ in no_split:
                    continue
                k = next(i for i, (n, _) in enumerate(todo) if n == tname)
                todo = [(name, module)] + todo[:k] + _split(tname, tmod) + todo[k + 1:]
                max_size, max_names = _max_layer([(n, m) for n, m in todo if isinstance(m, nn.Module)],
                                                 sizes, no_split)
                split = True
                break
            if split:
                continue
        if used[device] + size >= limit:
            kids = [] if isinstance(module, torch.Tensor) else _children(module)
            if kids and type(module).__name__ not in no_split:
                say("splitting %s", name)
                todo = _split(name, module) + todo
                max_size, max_names = _max_layer([(n, m) for n, m in todo if isinstance(m, nn.Module)],
                                                 sizes, no_split)
                continue
        if used[device] == 0 and fallback_allocation and device != "disk":
            limit = max_memory[device] - max(max_size, with_ties)
            fname, fmod, rest = _fallback(todo, sizes, limit - used[device], no_split, tied)
            if fmod is not None:
                todo = [(fname, fmod), (name, module)] + rest
                continue
        if used[device] == 0:
            minimum[device] = with_ties + reserved
        used[device] += reserved
        current += 1
        todo = [(name, module)] + todo
    return GreedyMap(device_map, {d: m for d, m in used.items() if m > 0}, buffers, minimum, dict(sizes))


def clean_device_map(device_map: dict, module_name: str = "") -> dict:
    """accelerate's `clean_device_map`: entries that all go to one device merge into their
    module's (the whole model on one device is ``{"": device}``). Changes `device_map`."""
    prefix = f"{module_name}." if module_name else ""
    values = [v for k, v in device_map.items() if k.startswith(prefix)]
    if len(set(values)) == 1 and len(values) > 1:
        for k in [k for k in device_map if k.startswith(prefix)]:
            del device_map[k]
        device_map[module_name] = values[0]
    depth = len(module_name.split(".")) + 1 if module_name else 1
    children = {".".join(k.split(".")[:depth]) for k in device_map if k.startswith(prefix) and len(k) > len(module_name)}
    for child in children:
        clean_device_map(device_map, child)
    return device_map


def _leaves(sizes: Mapping[str, int]) -> list[str]:
    children: dict[str, int] = {}
    for name in sizes:
        if name and "." in name:
            parent = name.rsplit(".", 1)[0]
            children[parent] = children.get(parent, 0) + 1
    return [name for name in sizes if name and not children.get(name, 0)]


def balanced_memory(model: nn.Module, max_memory: Mapping, no_split_module_classes=None, *,
                    dtype: torch.dtype | None = None, special_dtypes: Mapping | None = None,
                    low_zero: bool = False, defaulted: bool = False) -> dict:
    """accelerate's `get_balanced_memory` over `max_memory` (bytes; `defaulted`: it was
    measured, not given — one GPU then keeps 10 % free): each GPU but the last capped near
    an equal share of the model (plus 1.25 x its largest no-split block or mean layer),
    GPU 0 only what the others cannot hold with `low_zero`. Returns a new dict."""
    out = dict(max_memory)
    gpus = sorted(k for k, v in out.items() if isinstance(k, int) and v > 0)
    if not gpus:
        return out
    if len(gpus) == 1:
        low_zero = False
        if defaulted:
            out[gpus[0]] = int(out[gpus[0]] * 0.9)
    sizes = module_sizes_like_accelerate(model, dtype, special_dtypes)
    per_gpu = sizes[""] // (len(gpus) - 1 if low_zero else len(gpus))
    no_split = [no_split_module_classes] if isinstance(no_split_module_classes, str) else \
        list(no_split_module_classes or [])
    blocks: dict[str, int] = {}
    if no_split:
        for name, size in sizes.items():
            if not name:
                continue
            kind = type(model.get_submodule(name)).__name__ if _is_module(model, name) else ""
            if kind in no_split and kind not in blocks:
                blocks[kind] = size
            if set(blocks) == set(no_split):
                break
    buffer = max(blocks.values(), default=0)
    leaves = set(_leaves(sizes))
    modules = {n: v for n, v in sizes.items() if n not in leaves}
    final = _leaves(modules)
    mean = int(sum(modules[n] for n in final) / max(len(final), 1))
    per_gpu += int(1.25 * max(buffer, mean))
    for g in gpus[:-1]:
        out[g] = min(out[0] if low_zero and g == 0 else per_gpu, out[g])
    if low_zero:
        out[0] = min(max(0, sizes[""] - sum(out[g] for g in gpus[1:])), out[0])
    return out


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
