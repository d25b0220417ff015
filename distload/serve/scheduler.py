"""Continuous batching on rank 0: which sequence runs in which group, and when.

The KV-cache room the plan reserved (``max_batch_size`` sequences of ``max_seq_len``
tokens, `LoadPlan.run_shape`) is cut into `groups` groups of `group_size` slots; the
groups go round the pipeline's ring (`pipeline.schedules.continuous`), so that while one
group is on rank 1 the next is on rank 0 and every stage stays busy. Each time a group's
tokens come back, the scheduler

* hands every sequence its token (which may finish it: EOS, a stop, its `max_tokens`),
* launches the group's next step with its survivors plus the sequences whose prompt was
  prefilled meanwhile (finished and cancelled ones are dropped from every rank's cache by
  that very step; an empty group is dropped),
* and admits waiting requests into the group's free slots (their prompts are prefilled
  alone, then join at the group's next step).

Idle groups take new requests at once. No request waits for another's batch to end, and
admission never takes more slots than the reserve holds: requests beyond them wait in a
bounded queue (`submit` refuses past `max_queue`: the server answers 429).

The pipeline call lasts while there is work; when none is left the scheduler ends it, so
the other ranks wait for the next one without a time limit (`pipeline.calls`).

Who calls what: the server's handlers call `submit` (any thread); rank 0's main thread
runs `run` until `drain` was called and the work is done, or its deadline passed.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..dist import peers_gone
from ..errors import RankError
from ..log import logger
from ..pipeline.schedules.continuous import PREFILL, ContinuousDecoder
from .metrics import Metrics
from .sequence import Sequence

__all__ = ["Scheduler", "slots_for"]

_IDLE_POLL_S = 0.2


def slots_for(max_batch_size: int, in_flight: int) -> tuple[int, int]:
    """(groups, group_size): `in_flight` groups (fewer if the reserve holds fewer
    sequences) whose slots together are at most `max_batch_size`."""
    groups = max(1, min(in_flight, max_batch_size))
    return groups, max(1, max_batch_size // groups)


@dataclass(eq=False)
class _Group:
    members: list[Sequence] = field(default_factory=list)  # rows of its cache, in order
    joiners: list[Sequence] = field(default_factory=list)  # prefilled, to join next step
    prefilling: int = 0
    outstanding: int = 0       # messages in flight
    cached: bool = False       # the ranks hold a cache for it (DROP it when empty)

    @property
    def used(self) -> int:
        return len(self.members) + len(self.joiners) + self.prefilling


class Scheduler:
    """Rank 0's continuous-batching loop over a `ContinuousDecoder`."""

    def __init__(self, pipe, *, groups: int, group_size: int, max_queue: int,
                 metrics: Metrics | None = None, watch=None) -> None:
        self.decoder = ContinuousDecoder(pipe, max_rows=group_size)
        self.world = pipe.world
        self.groups = [_Group() for _ in range(groups)]
        self.group_size, self.max_queue = group_size, max_queue
        self.metrics = metrics or Metrics()
        self.metrics.gauges = self.gauges
        self._queue: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._by_id: dict[int, Sequence] = {}
        self._draining = False
        self._deadline: float | None = None
        self.served = 0
        # what else must live (the HTTP server): returns its trouble, or None
        self.watch = watch or (lambda: None)

    # ------------------------------------------------------------------ any thread
    def submit(self, seq: Sequence) -> bool:
        """Queue `seq`; False when the queue is full or the server is stopping."""
        with self._cond:
            if self._draining or len(self._queue) >= self.max_queue:
                return False
            self._queue.append(seq)
            self._cond.notify()
            return True

    def drain(self, timeout_s: float) -> None:
        """Stop admitting; `run` returns once in-flight and queued work is done, or after
        `timeout_s` with what is left aborted."""
        with self._cond:
            if not self._draining:
                self._draining, self._deadline = True, time.monotonic() + timeout_s
            self._cond.notify()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def capacity(self) -> int:
        return len(self.groups) * self.group_size

    def gauges(self) -> dict:
        used = sum(g.used for g in self.groups)
        return {"queue_depth": (len(self._queue), "Requests waiting for a slot."),
                "running_sequences": (used, "Sequences holding a KV-cache slot."),
                "kv_slots_used": (used, "KV-cache slots in use."),
                "kv_slots_total": (self.capacity, "KV-cache slots the plan's reserve holds.")}

    # ------------------------------------------------------------------ rank 0's main thread
    def run(self) -> None:
        """Serve until drained; a rank that died raises `RankError` naming it."""
        try:
            self._loop()
        except RankError as exc:  # a lost connection: say which rank, when it is on this host
            deadline, others = time.monotonic() + 1.0, range(1, self.world.world_size)
            while not (dead := peers_gone(others)) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._abort_all("the server stopped: a rank failed")
            if dead:
                raise RankError(f"rank {', '.join(map(str, dead))} died; the server stops") from exc
            raise

    def _loop(self) -> None:
        last_check = time.monotonic()
        while True:
            if self._draining and time.monotonic() > self._deadline:
                self._abort_all("the server stopped (shutdown timeout)")
            for index, group in enumerate(self.groups):
                if group.outstanding == 0:
                    self._next_round(index)
            if self.decoder.waiting:
                self._collect()
                continue
            if self.decoder.is_open:  # no work: end the call, the others idle without limit
                self.decoder.close()
            with self._cond:
                if self._draining and not self._queue:
                    return
                if not self._queue:
                    self._cond.wait(_IDLE_POLL_S)
            if time.monotonic() - last_check > 1.0:
                last_check = time.monotonic()
                dead = peers_gone(range(1, self.world.world_size))
                if dead:
                    raise RankError(f"rank {', '.join(map(str, dead))} died; the server stops")
                trouble = self.watch()
                if trouble:
                    raise RuntimeError(trouble)

    def _collect(self) -> None:
        kind, index, ids, tokens = self.decoder.next_result()
        group = self.groups[index]
        group.outstanding -= 1
        generated = 0
        for sid, token in zip(ids, tokens.tolist()):
            seq = self._by_id[sid]
            if kind == PREFILL:
                group.prefilling -= 1
                group.joiners.append(seq)
            if seq.alive:
                was = seq.last_token_at
                seq.accept(int(token))
                generated += 1
                if was is None:
                    self.metrics.ttft.observe(seq.first_token_at - seq.arrived)
                else:
                    self.metrics.itl.observe(seq.last_token_at - was)
        self.metrics.tokens(generated=generated)
        if group.outstanding == 0:
            self._next_round(index)

    def _next_round(self, index: int) -> None:
        """Group `index` has nothing in flight: step its live sequences (members, then
        joiners), free the rest, and fill its free slots from the queue."""
        group = self.groups[index]
        gone = [s for s in group.joiners if not s.alive]
        rows = [s for s in group.members if s.alive] + [s for s in group.joiners if s.alive]
        self._finish([s for s in group.members if not s.alive] + gone)
        if gone:
            self.decoder.forget([self._id(s) for s in gone])
        group.joiners = []
        if rows:
            self._open()
            self.decoder.step(index, [self._id(s) for s in rows], [s.last_token for s in rows])
            group.outstanding += 1
            group.cached = True
        elif group.cached:
            self.decoder.drop(index)
            group.cached = False
        group.members = rows
        while group.used < self.group_size:
            seq = self._pop()
            if seq is None:
                break
            self._open()
            sid = next(self._ids)
            self._by_id[sid] = seq
            seq.sid = sid
            self.decoder.prefill(index, sid, seq.prompt, seq.sampling)
            group.prefilling += 1
            group.outstanding += 1
            self.metrics.tokens(prompt=len(seq.prompt))

    def _pop(self) -> Sequence | None:
        with self._cond:
            while self._queue:
                seq = self._queue.popleft()
                if not seq.cancelled:
                    return seq
                seq.abort("cancelled")
        return None

    def _open(self) -> None:
        if not self.decoder.is_open:
            self.decoder.open()

    def _finish(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.abort("cancelled")  # a no-op for one that finished
            self._by_id.pop(self._id(seq), None)
            self.served += 1

    @staticmethod
    def _id(seq: Sequence) -> int:
        return seq.sid

    def _abort_all(self, why: str) -> None:
        """The deadline passed: every sequence ends now (they leave at their next step)."""
        with self._cond:
            queued, self._queue = list(self._queue), deque()
        for seq in queued + list(self._by_id.values()):
            if seq.finish_reason is None:
                logger.warning("aborting a request: %s", why)
            seq.abort(why)
            seq.cancel()
