"""Streamed execution of offloaded weights.

A unit (a module, e.g. one decoder layer) whose weights live on the CPU tier (host memory,
pinned on CUDA) or the disk tier (offload-store entries) keeps meta placeholders between
uses. A forward pre-hook brings its weights onto the device just before it runs; a forward
hook releases them after. Meanwhile the next offloaded units' weights are fetched in the
background — by a thread that `preadv`s entries (the GIL is released while it reads) and,
on CUDA, copies them from pinned buffers on a side stream that the compute stream waits
on. At most `max_resident` units hold weights at once (the running one included), so the
extra memory is bounded by ``max_resident * largest unit``. Units are fetched in the order
given, cyclically: after the last comes the first (the next forward or decoding step).

Called by `distload.offload.attach` for a loaded stage, and usable on any `nn.Module`.

Example::

    streamer = attach_streaming(model, ["model.layers.2", "model.layers.3"],
                                {n: entry for n, entry in entries.items()}, "cpu")
    logits = model(ids, position_ids=pos)      # layers 2 and 3 stream from the store
    streamer.stats.wait_seconds, streamer.stats.fetches
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from .. import trace
from ..io.pinned import arena_layout, pin_host
from .entry import Entry

__all__ = ["StreamStats", "Streamer", "attach_streaming", "streamer_of"]

_ATTR = "_distload_streamer"


@dataclass
class StreamStats:
    """What a `Streamer` did. `wait_seconds` is host time the forward spent blocked on
    offloaded weights (on CUDA the compute stream's wait for a copy is not in it)."""

    wait_seconds: float = 0.0    # time forward spent blocked on offloaded weights
    fetches: int = 0             # unit loads
    prefetched: int = 0          # loads started ahead, in the background
    bytes_fetched: int = 0
    peak_resident: int = 0       # the most units holding weights at once
    peak_resident_bytes: int = 0


@dataclass
class _Unit:
    name: str
    module: nn.Module
    slots: list[tuple[nn.Module, str, bool, str]]     # (owner, attr, is_param, group)
    sources: dict[str, torch.Tensor | Entry]          # group -> where its bytes are
    placeholders: dict[tuple[int, str], torch.Tensor]
    nbytes: int


def _nbytes(src: torch.Tensor | Entry) -> int:
    return src.nbytes if isinstance(src, Entry) else src.numel() * src.element_size()


class Streamer:
    """The hooks and prefetcher for a set of offloaded units of one module. Made by
    `attach_streaming`; `close()` removes the hooks (weights stay on meta)."""

    def __init__(self, units: list[_Unit], device: torch.device, *, prefetch: bool = True,
                 max_resident: int = 2):
        if max_resident < 1:
            raise ValueError(f"max_resident must be at least 1, got {max_resident}")
        self.units, self.device, self.max_resident = units, device, max_resident
        self.prefetch = prefetch and max_resident > 1
        self.stats = StreamStats()
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self._pending: dict[int, Future] = {}
        self._report: dict | None = None
        cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if cuda else None
        # Pinned staging for the disk tier on CUDA: one buffer per thread that loads (the
        # prefetch thread, the caller's), each the largest unit's entries, made once and
        # reused (a pinned buffer per fetch would go through the caching host allocator,
        # rounded up to a power of two and cached for good). `pinned_bytes` counts them.
        sizes = [arena_layout({g: s.nbytes for g, s in u.sources.items() if isinstance(s, Entry)})
                 for u in units] if cuda else []
        self._offsets = [offsets for offsets, _ in sizes]
        largest = max((total for _, total in sizes), default=0)
        count = (2 if self.prefetch else 1) if largest else 0
        # Events after the compute that last used a released unit's device memory: a load
        # waits for them before allocating, so that it reuses that memory (the caching
        # allocator holds a block back until the stream that used it is past it) rather
        # than briefly holding a third unit's worth beside the two the planner counted.
        self._freed: list = []
        self._freed_lock = threading.Lock()
        self._staging: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._staging.put(pin_host(largest))
        self.pinned_bytes = count * largest
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distload-prefetch") if self.prefetch else None
        self._handles = []
        for i, unit in enumerate(units):
            self._handles.append(unit.module.register_forward_pre_hook(lambda m, a, i=i: self._pre(i)))
            self._handles.append(unit.module.register_forward_hook(lambda m, a, o, i=i: self._post(i)))
            self._unassign(unit)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def bind_report(self, report: dict) -> None:
        """Keep ``report["offload_wait_seconds"]`` equal to `stats.wait_seconds`."""
        self._report = report
        report["offload_wait_seconds"] = round(self.stats.wait_seconds, 6)

    # ------------------------------------------------------------------ hooks
    def _pre(self, i: int) -> None:
        if i in self._resident:
            return
        start = time.perf_counter()
        with trace.span("offload wait", "offload", unit=self.units[i].name,
                        prefetched=i in self._pending, bytes=self.units[i].nbytes):
            if i in self._pending:
                tensors, ready = self._pending.pop(i).result()
                self.stats.prefetched += 1
            else:
                self._make_room(current=i)
                tensors, ready = self._load(i)
        if ready is not None:  # the compute stream waits for this unit's copies only
            torch.cuda.current_stream(self.device).wait_event(ready)
        self.stats.wait_seconds += time.perf_counter() - start
        if self._report is not None:
            self._report["offload_wait_seconds"] = round(self.stats.wait_seconds, 6)
        self._resident[i] = tensors
        self._assign(self.units[i], tensors)
        self._schedule(i)

    def _post(self, i: int) -> None:
        self._release(i)
        self._schedule(i)

    def _note_peak(self) -> None:
        held = list(self._resident) + list(self._pending)
        self.stats.peak_resident = max(self.stats.peak_resident, len(held))
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes,
                                             sum(self.units[j].nbytes for j in held))

    # ------------------------------------------------------------------ fetching
    def _load(self, i: int) -> tuple[dict[str, torch.Tensor], object]:
        """Unit `i`'s tensors on the device, and (CUDA) the event that marks their copies
        done. Runs on the prefetch thread, or the caller's without prefetch."""
        unit, out, ready = self.units[i], {}, None
        if self._side is None:
            for group, src in unit.sources.items():
                out[group] = src.read() if isinstance(src, Entry) else src.to(self.device)
        else:
            with self._freed_lock:
                freed, self._freed = self._freed, []
            for event in freed:
                event.synchronize()
            offsets = self._offsets[i]
            staging = self._staging.get() if offsets else None
            try:
                with torch.cuda.device(self.device), torch.cuda.stream(self._side):
                    for group, src in unit.sources.items():
                        if isinstance(src, Entry):
                            at = offsets[group]
                            host = src.read(staging[at:at + src.nbytes])
                        else:
                            host = src
                        out[group] = host.to(self.device, non_blocking=True)
                    ready = torch.cuda.Event(blocking=True)
                    ready.record(self._side)
            finally:
                if staging is not None:  # free again once the copies out of it are done
                    (ready or self._side).synchronize()
                    self._staging.put(staging)
        self.stats.fetches += 1
        self.stats.bytes_fetched += unit.nbytes
        return out, ready

    def _schedule(self, after: int) -> None:
        """Start fetching the next units (cyclically) while there is room."""
        n = len(self.units)
        for step in range(1, min(n, self.max_resident + 1) if self._pool is not None else 1):
            if len(self._resident) + len(self._pending) >= self.max_resident:
                break
            j = (after + step) % n
            if j not in self._resident and j not in self._pending:
                self._pending[j] = self._pool.submit(self._load, j)
        self._note_peak()

    def _make_room(self, current: int) -> None:
        while len(self._resident) + len(self._pending) >= self.max_resident:
            if self._pending:  # the fetch furthest ahead goes first
                n = len(self.units)
                j = max(self._pending, key=lambda k: (k - current) % n)
                fut = self._pending.pop(j)
                if not fut.cancel():
                    fut.exception()   # wait: its buffers must not outlive the bound
            elif any(j != current for j in self._resident):
                self._release(next(j for j in self._resident if j != current))
            else:
                return

    # ------------------------------------------------------------------ slots
    def _assign(self, unit: _Unit, tensors: dict[str, torch.Tensor]) -> None:
        made: dict[str, torch.Tensor] = {}
        for owner, attr, is_param, group in unit.slots:
            if group not in made:
                t = tensors[group]
                made[group] = nn.Parameter(t, requires_grad=False) if is_param else t
            (owner._parameters if is_param else owner._buffers)[attr] = made[group]

    def _unassign(self, unit: _Unit) -> None:
        for owner, attr, is_param, _ in unit.slots:
            (owner._parameters if is_param else owner._buffers)[attr] = unit.placeholders[(id(owner), attr)]

    def _release(self, i: int) -> None:
        tensors = self._resident.pop(i, None)
        if tensors is None:
            return
        if self._side is not None:  # the compute stream used them: no reuse before it is done
            stream = torch.cuda.current_stream(self.device)
            for t in tensors.values():
                t.record_stream(stream)
            done = torch.cuda.Event(blocking=True)
            done.record(stream)
            with self._freed_lock:
                self._freed.append(done)
        self._unassign(self.units[i])

    def release_all(self) -> None:
        """Drop every fetched or prefetched weight (e.g. between requests)."""
        for j in list(self._pending):
            fut = self._pending.pop(j)
            if not fut.cancel():
                fut.exception()
        for j in list(self._resident):
            self._release(j)

    def close(self) -> None:
        """Remove the hooks and the prefetch thread; offloaded weights stay on meta."""
        self.release_all()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def streamer_of(module: nn.Module) -> Streamer | None:
    """The `Streamer` attached to `module` (by `attach_streaming`), if any."""
    return getattr(module, _ATTR, None)


def attach_streaming(module: nn.Module, unit_names: Sequence[str],
                     source: Mapping[str, torch.Tensor | Entry], device: torch.device | str, *,
                     prefetch: bool = True, max_resident: int = 2) -> Streamer:
    """Stream the weights of units `unit_names` (submodule names, in execution order) of
    `module` onto `device` around each unit's forward.

    `source` maps tensor names (as in ``module.state_dict()``, parameters or persistent
    buffers, each under one of the units) to where the bytes are: a CPU tensor (the CPU
    tier; pin it for fast copies to CUDA) or an offload-store `Entry` (the disk tier).
    Tensors of a unit that `source` lacks stay where they are. Those in `source` are
    replaced by meta placeholders until their unit runs. Tensors that are one object (or
    one entry) are fetched once per unit and stay tied.

    Returns the `Streamer` (also `streamer_of(module)`); a previous one is closed first.

    Example::

        cpu = {n: p.detach().cpu().pin_memory() for n, p in model.named_parameters()
               if n.startswith("model.layers.1.")}
        attach_streaming(model, ["model.layers.1"], cpu, "cuda:0", max_resident=2)
    """
    device = torch.device(device)
    names = list(unit_names)
    for a in names:
        try:
            module.get_submodule(a)
        except AttributeError:
            raise ValueError(f"unit {a!r} is not a submodule of {type(module).__name__}") from None
        inner = [b for b in names if b != a and b.startswith(a + ".")]
        if inner or names.count(a) > 1:
            raise ValueError(f"units must be distinct and disjoint: {a!r} and {(inner or [a])[0]!r}")
    units, used = [], set()
    for name in names:
        prefix = f"{name}." if name else ""
        slots, sources, placeholders, groups = [], {}, {}, {}
        for tname in sorted(t for t in source if t.startswith(prefix)):
            src = source[tname]
            if not isinstance(src, (torch.Tensor, Entry)):
                raise TypeError(f"source[{tname!r}] is a {type(src).__name__}, not a tensor or Entry")
            owner_name, _, attr = tname.rpartition(".")
            owner = module.get_submodule(owner_name)
            is_param = attr in owner._parameters
            if not is_param and attr not in owner._buffers:
                raise ValueError(f"{tname!r} is neither a parameter nor a buffer of {owner_name!r}")
            ident = src.key if isinstance(src, Entry) else str(id(src))
            group = groups.setdefault(ident, tname)
            sources[group] = src
            current = (owner._parameters if is_param else owner._buffers)[attr]
            shape, dtype = ((src.shape, src.torch_dtype) if isinstance(src, Entry)
                            else (tuple(src.shape), src.dtype))
            if current is not None and tuple(current.shape) != tuple(shape):
                raise ValueError(f"{tname}: source shape {tuple(shape)} != the module's {tuple(current.shape)}")
            meta = torch.empty(shape, dtype=dtype, device="meta")
            placeholders[(id(owner), attr)] = nn.Parameter(meta, requires_grad=False) if is_param else meta
            slots.append((owner, attr, is_param, group))
            used.add(tname)
        if not slots:
            raise ValueError(f"unit {name!r} has no tensors in `source`: nothing to stream")
        units.append(_Unit(name, module.get_submodule(name), slots, sources, placeholders,
                           sum(_nbytes(s) for s in sources.values())))
    if set(source) - used:
        extra = sorted(set(source) - used)
        raise ValueError(f"{len(extra)} source tensor(s) under no unit: {', '.join(extra[:5])}")
    old = streamer_of(module)
    if old is not None:
        old.close()
    streamer = Streamer(units, device, prefetch=prefetch, max_resident=max_resident)
    object.__setattr__(module, _ATTR, streamer)
    return streamer
