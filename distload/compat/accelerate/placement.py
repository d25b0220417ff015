"""Reading a device map: where each parameter, buffer and module goes, whether those
devices exist here, and the accelerate switches distload answers with one message.

Rules (accelerate's, with its crashes fixed):

* A parameter's device comes from the longest map key that is its name or a dotted prefix
  of it (``""`` matches everything); a parameter no key covers is an error naming it.
* A module the map does not name (a RoPE module holding only buffers, a parent whose
  children are named one by one) takes its parent's device; the model itself, unnamed,
  takes the device of the first module the map names (where its forward begins). Buffers
  follow their module.
* Every device must exist on this machine before a byte is read: ``0`` or ``"cuda:0"``
  needs that GPU; ``"cpu"`` and ``"disk"`` always exist.

Example::

    device_for("model.layers.3.mlp.up_proj.weight", {"model.layers": 0, "": "cpu"})  # ('model.layers', 0)
    module_devices(model, {"model.embed_tokens": 0, "model.layers": 0, "lm_head": "cpu"})
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...errors import LoadError
from ...log import logger

__all__ = ["device_for", "module_devices", "check_devices_present", "normalize_device", "placement",
           "warn_once", "RESIDENT", "HOST", "DISK"]

RESIDENT, HOST, DISK = "resident", "host", "disk"
_SAID: set[str] = set()


def warn_once(name: str, message: str, *, level: int = 30) -> None:
    """Log `message` about accelerate switch `name` once per process (WARNING by default)."""
    if name not in _SAID:
        _SAID.add(name)
        logger.log(level, "%s", message)


def device_for(name: str, device_map: Mapping[str, int | str]) -> tuple[str, int | str]:
    """(the device-map key, its device) for tensor or module `name`: the longest key that
    is `name` or a dotted prefix of it (``""`` matches everything). KeyError if none."""
    best = None
    for key in device_map:
        if key == "" or name == key or name.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    if best is None:
        raise KeyError(name)
    return best, device_map[best]


def module_devices(model: nn.Module, device_map: Mapping[str, int | str]) -> dict[str, int | str]:
    """The device of every module of `model` under `device_map` (see the module docstring);
    empty when the map names no module at all."""
    order = [name for name, _ in model.named_modules()]
    named: dict[str, int | str] = {}
    for name in order:
        try:
            named[name] = device_for(name, device_map)[1]
        except KeyError:
            pass
    if not named:
        return {}
    out: dict[str, int | str] = {}
    first = next(named[name] for name in order if name in named)
    for name in order:  # pre-order: a parent comes before its children
        if name in named:
            out[name] = named[name]
        elif name:
            out[name] = out[name.rpartition(".")[0]]
        else:
            out[name] = first
    return out


def normalize_device(device) -> int | str | torch.device:
    """``"cuda:1"`` / ``torch.device("cuda", 1)`` → ``1``; other values as given."""
    if isinstance(device, torch.device):
        return device.index if device.type == "cuda" and device.index is not None else device
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return device


def placement(device, main: torch.device, *, stream_host: bool = True) -> tuple[str, torch.device | None]:
    """(kind, device) of a map value: a GPU or other device is RESIDENT there; ``"cpu"`` is
    RESIDENT on the CPU, or — with GPUs and `stream_host` — HOST (pinned, streamed to
    `main`); ``"disk"`` is DISK (offload store, streamed)."""
    device = normalize_device(device)
    if isinstance(device, int):
        return RESIDENT, torch.device("cuda", device)
    if device == "cpu":
        return (HOST, None) if main.type == "cuda" and stream_host else (RESIDENT, torch.device("cpu"))
    if device == "disk":
        return DISK, None
    return RESIDENT, torch.device(device)


def check_devices_present(device_map: Mapping[str, int | str]) -> None:
    """Raise `LoadError` naming the first device of `device_map` this machine lacks (and a
    key placed on it), before anything is read."""
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key, value in device_map.items():
        device = normalize_device(value)
        if device in ("cpu", "disk"):
            continue
        where = f"device_map places {key or 'the whole model'!r} on {value!r}"
        if isinstance(device, int):
            if device >= present:
                have = "no CUDA device" if not present else f"only {present} GPU(s) (0..{present - 1})"
                raise LoadError(f"{where}, but this machine has {have}: plan a map for this machine "
                                "(e.g. infer_auto_device_map with max_memory={'cpu': ...})")
            continue
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise LoadError(f"{where}, which is not a device: {e}") from None
        if dev.type == "cuda" and not present:
            raise LoadError(f"{where}, but this machine has no CUDA device")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise LoadError(f"{where}, but MPS is not available on this machine")
        if dev.type not in ("cuda", "mps", "cpu", "meta") and not _available(dev.type):
            raise LoadError(f"{where}, but no {dev.type} device is available on this machine")


def _available(kind: str) -> bool:
    backend = getattr(torch, kind, None)
    probe = getattr(backend, "is_available", None)
    return bool(probe()) if callable(probe) else False
