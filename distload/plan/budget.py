"""Memory budgets: parse the user's `max_memory`, measure what a rank has, and combine the
two into one `RankBudget` per rank for the planner.

`max_memory` maps keys to sizes:

* an int ``N`` (or ``"N"``, or ``"cuda:N"``): rank N's device under torchrun (GPU N in
  single-process use, as in accelerate);
* ``"cpu"``: host memory for the CPU tier, per *node*, shared evenly by its ranks;
* ``"disk"``: offload-directory space for the disk tier, per node, shared likewise.

Sizes are ints (bytes) or strings with a unit: ``"20GB"`` = 20 * 10**9, ``"20GiB"`` =
20 * 2**30, ``"512MiB"``, ``"1.5TB"``. Units are case-insensitive and always mean bytes
(``"20gb"`` is 20 * 10**9 bytes, never bits). A bare prefix (``"20G"``) is ambiguous and
rejected with a message asking for GB or GiB. The user's dict is never mutated.

Who calls what: every rank measures itself (`distload.loader.memory.measure_local`, a
`LocalMemory`); rank 0 gathers those and calls `resolve_budgets`. Everything here is pure.

Example::

    parse_size("512MiB")                          # 536870912
    parse_max_memory({0: "20GiB", "cpu": "64GB"})  # {0: 21474836480, 'cpu': 64000000000}
    resolve_budgets(parse_max_memory({0: "1GiB"}), [LocalMemory("cuda", 8 << 30, 64 << 30)])
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "parse_size", "parse_max_memory", "parse_max_memory_arg", "format_bytes",
    "LocalMemory", "RankBudget", "resolve_budgets", "device_margin",
    "HOST_FRACTION",
]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
_AMBIGUOUS = {"k", "m", "g", "t", "p"}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
HOST_FRACTION = 0.9  # of the host's available RAM that the planner may use by default


def parse_size(value: int | str) -> int:
    """Bytes of a size: an int, or a string like ``"20GB"``, ``"20GiB"``, ``"512 MiB"``.

    Raises ValueError for negative sizes, unknown units, and the ambiguous ``"20G"``.

    Example::

        parse_size("20GB"), parse_size("20GiB"), parse_size(1024)  # 20*10**9, 20*2**30, 1024
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"memory size {value!r} must be an int (bytes) or a string like '20GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory size {value} is negative")
        return value
    m = _SIZE_RE.match(value)
    if m is None:
        raise ValueError(f"memory size {value!r} is not a number with a unit, like '20GB' or '20GiB'")
    number, unit = m.group(1), m.group(2).lower()
    if unit in _AMBIGUOUS:
        raise ValueError(f"memory size {value!r} is ambiguous: write {number}{unit.upper()}B "
                         f"(10^{3 * ' kmgtp'.index(unit)} bytes) or {number}{unit.upper()}iB "
                         f"(2^{10 * ' kmgtp'.index(unit)} bytes)")
    if unit not in _UNITS:
        raise ValueError(f"memory size {value!r}: unknown unit {m.group(2)!r} "
                         "(use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)")
    scale = _UNITS[unit]
    if "." in number:  # exact for whole numbers of a unit; decimals round down to a byte
        whole, _, frac = number.partition(".")
        return int(whole or 0) * scale + (int(frac or 0) * scale) // (10 ** len(frac))
    return int(number) * scale


def _parse_key(key) -> int | str:
    if isinstance(key, bool):
        raise ValueError(f"max_memory key {key!r} is not a device")
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"max_memory key {key} is negative")
        return key
    if isinstance(key, str):
        k = key.strip().lower()
        if k in ("cpu", "disk"):
            return k
        if k.startswith("cuda:"):
            k = k[5:]
        if k.isdigit():
            return int(k)
    raise ValueError(f"max_memory key {key!r} is not a device: use a rank/GPU index (0 or "
                     "'cuda:0'), 'cpu' or 'disk'")


def parse_max_memory(max_memory: Mapping | None) -> dict[int | str, int]:
    """A new dict with normalized keys (ints for devices, ``"cpu"``, ``"disk"``) and sizes
    in bytes; ``{}`` for None. The argument is left untouched.

    Example::

        parse_max_memory({"cuda:1": "2GiB", "cpu": 10**9})   # {1: 2147483648, 'cpu': 1000000000}
    """
    if max_memory is None:
        return {}
    if not isinstance(max_memory, Mapping):
        raise ValueError(f"max_memory must be a dict like {{0: '20GiB', 'cpu': '64GiB'}}, "
                         f"not {type(max_memory).__name__}")
    out: dict[int | str, int] = {}
    for key, value in max_memory.items():
        k = _parse_key(key)
        if k in out:
            raise ValueError(f"max_memory names device {k!r} twice (key {key!r})")
        try:
            out[k] = parse_size(value)
        except ValueError as e:
            raise ValueError(f"max_memory[{key!r}]: {e}") from None
    return out


def parse_max_memory_arg(text: str | None) -> dict[int | str, int]:
    """The CLI's ``--max-memory``: ``"0=20GiB,1=20GiB,cpu=64GiB,disk=1TB"`` or a JSON
    object ``'{"0": "20GiB", "cpu": "64GiB"}'``.

    Example::

        parse_max_memory_arg("0=1GB,cpu=2GiB")   # {0: 1000000000, 'cpu': 2147483648}
    """
    if text is None or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            return parse_max_memory(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"--max-memory is not valid JSON: {e}") from None
    pairs = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--max-memory entry {part!r} is not KEY=SIZE (e.g. 0=20GiB,cpu=64GiB)")
        pairs[key.strip()] = value.strip()
    return parse_max_memory(pairs)


def format_bytes(n: int | None) -> str:
    """``1536`` → ``"1.5 KiB"``; None → ``"unlimited"``."""
    if n is None:
        return "unlimited"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class LocalMemory:
    """What one rank measured for itself (`measure_local`): its device type, free device
    memory (None on a CPU device), the node's available host RAM, the free space of the
    offload directory's file system (None: unknown) and the ranks on this node."""

    device_type: str
    device_free: int | None
    host_available: int
    disk_free: int | None = None
    local_world_size: int = 1


@dataclass(frozen=True)
class RankBudget:
    """The bytes the planner may place on one rank: on its device, its CPU tier and its disk
    tier (None: unlimited). `source` says where each figure came from, for --explain.
    `pinned`: the device is a GPU, so the disk tier streams through pinned host staging
    that the CPU budget must also hold (a CPU device reads straight into its tensors)."""

    device: int
    cpu: int = 0
    disk: int | None = None
    source: str = ""
    pinned: bool = False

    def as_dict(self) -> dict:
        return {"device": self.device, "cpu": self.cpu, "disk": self.disk, "source": self.source}


def device_margin(free: int) -> int:
    """Device bytes kept back from the measured free memory (allocator fragmentation, CUDA
    context growth, kernels' workspaces): 5 %, at least 256 MiB, at most what is free."""
    return min(free, max(256 << 20, free // 20))


def resolve_budgets(max_memory: Mapping[int | str, int],
                    measured: Sequence[LocalMemory]) -> tuple[RankBudget, ...]:
    """One `RankBudget` per rank: the user's figures (from `parse_max_memory`) where given,
    else the measured ones. Pure (rank 0 calls it with every rank's `LocalMemory`).

    * device: ``max_memory[rank]``, else free GPU memory minus `device_margin`; a CPU
      device without a key gets the rank's host share, and then has no separate CPU tier.
    * cpu: ``max_memory["cpu"]`` (else ``HOST_FRACTION`` of available RAM), divided by
      the node's ranks.
    * disk: ``max_memory["disk"]`` (else the offload directory's free space, else
      unlimited), divided by the node's ranks.

    Example::

        resolve_budgets({0: 10**9, "cpu": 4 * 10**9}, [LocalMemory("cpu", None, 8 << 30, None, 2)] * 2)
    """
    world = len(measured)
    extra = sorted(k for k in max_memory if isinstance(k, int) and k >= world)
    if extra:
        raise ValueError(f"max_memory names device(s) {extra} but the world has {world} rank(s) "
                         f"(0..{world - 1})")
    budgets = []
    for rank, m in enumerate(measured):
        lws = max(1, m.local_world_size)
        share = "" if lws == 1 else f" / {lws} ranks"
        if "cpu" in max_memory:
            host, host_src = max_memory["cpu"] // lws, f"max_memory['cpu']{share}"
        else:
            host, host_src = int(m.host_available * HOST_FRACTION) // lws, f"{HOST_FRACTION:.0%} of free RAM{share}"
        if "disk" in max_memory:
            disk, disk_src = max_memory["disk"] // lws, f"max_memory['disk']{share}"
        elif m.disk_free is not None:
            disk, disk_src = m.disk_free // lws, f"free disk{share}"
        else:
            disk, disk_src = None, "unlimited"
        if rank in max_memory:
            device, dev_src, cpu = max_memory[rank], f"max_memory[{rank}]", host
        elif m.device_type == "cuda" and m.device_free is not None:
            device, dev_src, cpu = m.device_free - device_margin(m.device_free), "free GPU memory - margin", host
        else:  # a CPU device: its memory is the host's, so there is no separate CPU tier
            device, dev_src, cpu, host_src = host, host_src, 0, "none (the device is the CPU)"
        budgets.append(RankBudget(device, cpu, disk, f"device: {dev_src}; cpu: {host_src}; disk: {disk_src}",
                                  pinned=m.device_type == "cuda"))
    return tuple(budgets)
