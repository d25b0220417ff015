"""accelerate's `preload_module_classes`: a module of one of those classes, in an offloaded
part of a device map, fetches all of its weights — its submodules' too — when its own
forward starts and releases them when it ends, instead of each submodule fetching its own
around the submodule's forward. It is for modules that use a child's weight directly
(``x @ self.dense.weight.T``) instead of calling the child, whose weight would otherwise
still be a meta placeholder when it is read.

distload streams an offloaded part by *units* (`distload.offload.attach_streaming`: a
unit's weights are all fetched before its forward, released after), so the keyword is a
choice of units: the unit an offloaded tensor would stream with gives way to the outermost
module of a listed class that holds it, as accelerate's hooks are attached (from each key
of the map down, `attach_align_device_hook`; from the model itself for `cpu_offload` and
`disk_offload`). A module holding a resident tensor below it (a deeper key of the map on a
device) is not preloaded: its children are not all offloaded.

Example::

    unit = preload_unit(dict(model.named_modules()), "block.linear", "block",
                        frozenset({"Block"}))                       # "block"
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from torch import nn

__all__ = ["preload_classes", "preload_unit", "blocked_by", "enclosing"]


def preload_classes(classes) -> frozenset[str]:
    """accelerate's argument (None, or class names) as a set of class names."""
    if not classes:
        return frozenset()
    return frozenset([classes] if isinstance(classes, str) else classes)


def enclosing(name: str) -> list[str]:
    """The modules that hold module `name`, outermost first, the model itself ("")
    included, `name` itself last ("a.b" -> ["", "a", "a.b"])."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


def preload_unit(modules: Mapping[str, nn.Module], unit: str, entry: str, classes: frozenset[str], *,
                 blocked: Collection[str] = (), root: bool = False) -> str:
    """The unit an offloaded tensor streams with: `unit` (the one it would otherwise take),
    or the outermost module of a class in `classes` that holds `unit` and lies at or below
    `entry` (the map key its hooks start from; "" the whole model), not in `blocked`
    (modules with a resident tensor below them). The model itself qualifies only with
    `root` (where the caller can stream it as one unit)."""
    if not classes:
        return unit
    for name in enclosing(unit):
        if name == "" and not root:
            continue
        below = entry == "" or name == entry or name.startswith(entry + ".")
        if below and name not in blocked and type(modules[name]).__name__ in classes:
            return name
    return unit


def blocked_by(resident: Collection[str]) -> set[str]:
    """The modules that cannot be preloaded as one unit: those holding, in a proper
    submodule, a tensor in `resident` (full tensor names) — a tensor directly on a
    module (the model's own parameters) is already in place when it runs."""
    out: set[str] = set()
    for tensor in resident:
        owner = tensor.rpartition(".")[0]
        out.update(enclosing(owner)[:-1])
    return out
