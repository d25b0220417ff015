"""A timeline of what each rank does, as Chrome/Perfetto trace events (``--trace PATH``).

Off by default: `span` then returns one shared no-op context manager, so an instrumented
step costs a global lookup and an empty ``with``. `enable` starts a recorder in this
process; each rank records its own events (from any thread); rank 0 gathers every
rank's `Recording` (`distload.loader.tracing`) and writes one JSON file in the
trace-event format (open it in ui.perfetto.dev or chrome://tracing): one track (process)
per rank, one row per thread.

A leaf like `log.py`: it imports nothing of distload, so `io`, `offload` and `pipeline`
record into it without import cycles.

Example::

    from distload import trace

    trace.enable()
    with trace.span("read", file="model-00001.safetensors", bytes=1 << 20):
        ...
    recording = trace.disable()                       # this rank's events
    trace.write_chrome_trace("out.json", {0: recording}, labels={0: "rank 0"})
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Recording", "enable", "disable", "active", "span", "instant", "snapshot",
           "chrome_trace", "write_chrome_trace", "DEFAULT_MAX_EVENTS"]

DEFAULT_MAX_EVENTS = 2_000_000  # per rank: a long generation must not grow without bound


@dataclass
class Recording:
    """One rank's events: ``(name, category, phase, start µs, duration µs, thread, args)``
    with start in microseconds of the wall clock (ranks of one host line up), phase
    ``"X"`` (a span) or ``"i"`` (an instant); the thread names; events dropped past the
    cap."""

    events: list[tuple] = field(default_factory=list)
    threads: dict[int, str] = field(default_factory=dict)
    dropped: int = 0


class _Recorder:
    def __init__(self, max_events: int) -> None:
        self.recording = Recording()
        self.max_events = max_events
        # wall-clock µs = perf_counter ns / 1000 + offset: monotonic within the rank
        self.offset_us = time.time_ns() / 1000 - time.perf_counter_ns() / 1000
        self._tids: dict[int, int] = {}
        self._lock = threading.Lock()

    def tid(self) -> int:
        ident = threading.get_ident()
        tid = self._tids.get(ident)
        if tid is None:
            with self._lock:
                tid = self._tids.setdefault(ident, len(self._tids))
                self.recording.threads[tid] = threading.current_thread().name
        return tid

    def add(self, event: tuple) -> None:
        events = self.recording.events
        if len(events) < self.max_events:
            events.append(event)   # list.append is atomic: reader threads record too
        else:
            self.recording.dropped += 1


_recorder: _Recorder | None = None


class _NoSpan:
    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def set(self, **args: Any) -> None:
        """Add arguments known only at the end (no-op when tracing is off)."""


_NO_SPAN = _NoSpan()


class _Span:
    __slots__ = ("_rec", "_name", "_cat", "_args", "_start")

    def __init__(self, rec: _Recorder, name: str, cat: str, args: dict) -> None:
        self._rec, self._name, self._cat, self._args = rec, name, cat, args

    def __enter__(self) -> _Span:
        self._start = time.perf_counter_ns()
        return self

    def set(self, **args: Any) -> None:
        self._args.update(args)

    def __exit__(self, kind, exc, tb) -> bool:
        end = time.perf_counter_ns()
        if kind is not None:
            self._args["error"] = kind.__name__
        rec = self._rec
        rec.add((self._name, self._cat, "X", self._start / 1000 + rec.offset_us,
                 (end - self._start) / 1000, rec.tid(), self._args))
        return False


def enable(*, max_events: int = DEFAULT_MAX_EVENTS) -> None:
    """Start recording in this process (a fresh recording)."""
    global _recorder
    _recorder = _Recorder(max_events)


def disable() -> Recording | None:
    """Stop recording; returns what was recorded (None if tracing was off)."""
    global _recorder
    rec, _recorder = _recorder, None
    return None if rec is None else rec.recording


def active() -> bool:
    return _recorder is not None


def snapshot() -> Recording | None:
    """What was recorded so far, recording going on (None if tracing is off)."""
    rec = _recorder
    if rec is None:
        return None
    r = rec.recording
    return Recording(list(r.events), dict(r.threads), r.dropped)


def span(name: str, cat: str = "", **args: Any):
    """A context manager recording one span of this thread, with `args` shown in the
    viewer; a shared no-op when tracing is off.

    Example::

        with trace.span("forward", "pipeline", micro_batch=i, rows=n) as s:
            out = stage(x)
            s.set(tokens=out.shape[1])
    """
    rec = _recorder
    if rec is None:
        return _NO_SPAN
    return _Span(rec, name, cat, args)


def instant(name: str, cat: str = "", **args: Any) -> None:
    """A point in time on this thread's row (nothing when tracing is off)."""
    rec = _recorder
    if rec is not None:
        rec.add((name, cat, "i", time.perf_counter_ns() / 1000 + rec.offset_us, 0.0, rec.tid(), args))


def chrome_trace(recordings: dict[int, Recording], labels: dict[int, str] | None = None) -> dict:
    """The trace-event JSON object of every rank's recording: process `rank` is rank
    `rank` (named by `labels`, sorted by rank), its threads named; times in µs from the
    earliest event."""
    labels = labels or {}
    starts = [e[3] for r in recordings.values() for e in r.events]
    t0 = min(starts) if starts else 0.0
    out: list[dict] = []
    for rank in sorted(recordings):
        rec = recordings[rank]
        out.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                    "args": {"name": labels.get(rank, f"rank {rank}")}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                    "args": {"sort_index": rank}})
        for tid, name in sorted(rec.threads.items()):
            out.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                        "args": {"name": name}})
        for name, cat, ph, ts, dur, tid, args in rec.events:
            event = {"name": name, "cat": cat or "distload", "ph": ph, "pid": rank, "tid": tid,
                     "ts": round(ts - t0, 3), "args": args}
            if ph == "X":
                event["dur"] = round(dur, 3)
            else:
                event["s"] = "t"
            out.append(event)
        if rec.dropped:
            out.append({"name": f"{rec.dropped} events dropped (cap reached)", "ph": "i", "s": "p",
                        "pid": rank, "tid": 0, "ts": 0, "args": {}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str | os.PathLike, recordings: dict[int, Recording],
                       labels: dict[int, str] | None = None) -> None:
    """Write `chrome_trace(...)` to `path` atomically (a viewer never sees half a file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(recordings, labels), f, separators=(",", ":"), default=str)
        f.write("\n")
    os.replace(tmp, path)
