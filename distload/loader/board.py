"""The job's board for one load: a few keys in the job's store (`distload.dist.job_store`,
which `distload.pipeline.calls` uses too) through which ranks tell each other how far
they are, without a collective.

* ``state/<rank>``: that rank's state as JSON — its phase, bytes read of its total, the
  file it reads, the wall time of its last update. Only that rank writes it (at most
  every 0.2 s, see `distload.loader.progress`); rank 0 reads them all in one `multi_get`.
* ``arrive/<point>/<rank>`` and ``count/<point>``: that rank reached `point`, and how
  many have (see `distload.loader.waits`).
* ``abort``: why a rank gave up waiting, for the late rank to say when it arrives.

Keys live under a prefix made of the plan's digest and a count of the loads this process
made, so every rank finds the same keys without agreeing on them, and two loads never
share them. They are left in the store (a few per rank and load): deleting an arrival key
could make a rank that has not yet seen it wait for it in vain. In a world of one the
board is an in-process `HashStore`.

Example::

    board = JobBoard.open(world, plan)
    board.set_state(world.rank, {"phase": "reading", "bytes": 0})
    states = board.states()           # rank 0: every rank's latest state
"""

from __future__ import annotations

import itertools
import json

import torch.distributed as dist

from ..dist import World, job_key, job_store

__all__ = ["JobBoard"]

_LOADS = itertools.count()  # every rank calls `open` once per load, in the same order


class JobBoard:
    """One load's keys in the job's store (see the module doc)."""

    def __init__(self, store, prefix: str, world_size: int, rank: int) -> None:
        self.store, self.prefix, self.world_size, self.rank = store, prefix, world_size, rank

    @classmethod
    def open(cls, world: World, plan) -> JobBoard:
        """Every rank, once per load, after the plan arrived. Rank 0 makes every rank's
        state key (without overwriting one a fast rank already set), so that reading
        them never blocks."""
        store = job_store() if world.distributed else dist.HashStore()
        board = cls(store, job_key("load", plan.digest()[:16], next(_LOADS), ""), world.world_size, world.rank)
        if world.is_first:
            for r in range(world.world_size):
                store.compare_set(board._state_key(r), "", json.dumps({"phase": "starting"}))
        return board

    def clone(self) -> JobBoard:
        """The same keys through a connection of its own: a store client serves one
        request at a time, so rank 0's progress thread must not queue behind the main
        thread's wait for the other ranks."""
        return JobBoard(self.store.clone(), self.prefix, self.world_size, self.rank)

    def _state_key(self, rank: int) -> str:
        return f"{self.prefix}state/{rank}"

    def _arrive_key(self, point: str, rank: int) -> str:
        return f"{self.prefix}arrive/{point}/{rank}"

    # ------------------------------------------------------------------ states
    def set_state(self, rank: int, state: dict) -> None:
        self.store.set(self._state_key(rank), json.dumps(state))

    def states(self) -> list[dict]:
        """Every rank's latest state (rank 0, after `open`: the keys exist)."""
        raw = self.store.multi_get([self._state_key(r) for r in range(self.world_size)])
        return [json.loads(v) for v in raw]

    def state(self, rank: int) -> dict:
        """One rank's latest state ({} if it never wrote one and rank 0 has not made it)."""
        key = self._state_key(rank)
        return json.loads(self.store.get(key)) if self.store.check([key]) else {}

    # ------------------------------------------------------------------ arrivals
    def arrive(self, point: str) -> None:
        self.store.set(self._arrive_key(point, self.rank), "1")
        self.store.add(f"{self.prefix}count/{point}", 1)

    def count(self, point: str) -> int:
        """How many ranks arrived at `point` (a few bytes per request)."""
        return self.store.add(f"{self.prefix}count/{point}", 0)

    def missing(self, point: str) -> list[int]:
        """The ranks that have not arrived at `point` (one request per rank)."""
        return [r for r in range(self.world_size) if not self.store.check([self._arrive_key(point, r)])]

    def abort(self, message: str) -> None:
        self.store.set(f"{self.prefix}abort", message)

    def aborted(self) -> str | None:
        """The message of a rank that gave up waiting, if one did."""
        key = f"{self.prefix}abort"
        return self.store.get(key).decode() if self.store.check([key]) else None
