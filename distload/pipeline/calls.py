"""Call announcements: rank 0 tells the other ranks which call comes next.

Every pipelined call (`forward`, `forward_stream`, `generate`: a schedule's name, see
`schedules`) starts with rank 0 writing that name under a numbered key in the job's store (`distload.dist.job_store`).
The other ranks wait on that key, and that wait has no time limit, unlike a receive
(which fails after the process group's timeout), so they can sit idle between calls
for as long as rank 0 does: a serving launcher's rank 0 waits for requests while the
others run `pipe.serve()`. A rank that makes another call than rank 0 learns so at once,
with both calls named, instead of waiting out the timeout on mismatched messages.

Per call: one store round trip on rank 0 (tens of microseconds); three on each other rank
(wait, get, and a read count, so that the last reader deletes the key), taken while rank
0 already computes. None per batch or token.

Who calls what: every rank opens the channel once, in `distload.load`; rank 0
`announce`s each call, the others `expect` it (or take `next_call` in `serve`).
"""

from __future__ import annotations

import atexit
import datetime
import uuid

import torch.distributed as dist

from ..dist import World, job_key, job_store, run_on_rank0
from ..errors import RankError

__all__ = ["CallChannel", "FORWARD", "GENERATE", "CLOSE"]

FORWARD, GENERATE, CLOSE = "forward", "generate", "close"

# A store wait that times out is retried; the chunk only bounds how often the store
# client logs its timeout warning while a rank idles.
_IDLE_CHUNK = datetime.timedelta(hours=1)


class CallChannel:
    """The numbered call keys of one loaded pipeline in the job's store."""

    def __init__(self, store, prefix: str, readers: int) -> None:
        self._store, self._prefix, self._count = store, prefix, 0
        self._readers = readers  # the ranks other than 0
        self.closed = False

    @classmethod
    def open(cls, world: World) -> CallChannel | None:
        """Every rank, once per pipeline (None in a world of one). Rank 0 picks the keys'
        prefix, so keys left in a long-lived store by an earlier job never match."""
        if not world.distributed:
            return None
        token = run_on_rank0(world, lambda: uuid.uuid4().hex[:16])
        channel = cls(job_store(), job_key(token, "call", ""), world.world_size - 1)
        if world.is_first:  # a rank 0 that forgets close() must not leave serve() waiting
            atexit.register(channel.close_at_exit)
        return channel

    @property
    def store(self):
        """The job's store (the calls' keys, and `figures`')."""
        return self._store

    @property
    def count(self) -> int:
        """How many calls this rank has taken part in (the same on every rank)."""
        return self._count

    def shared_key(self, name: str) -> str:
        """A key of this pipeline's own in the job's store."""
        return f"{self._prefix}{name}"

    def announce(self, kind: str) -> None:
        """Rank 0, at the start of each call."""
        if self.closed:
            raise RuntimeError("this pipeline was closed; load it again to make more calls")
        self._count += 1
        self._store.set(self._key(self._count), kind)
        self.closed = kind == CLOSE

    def close_at_exit(self) -> None:
        """Rank 0's interpreter is exiting: end the others' `serve()` loops."""
        if not self.closed:
            try:
                self.announce(CLOSE)
            except Exception:  # noqa: BLE001 - the store went with the job: nobody is waiting
                pass

    def next_call(self) -> str:
        """Ranks other than 0: wait, without a time limit, for rank 0's next call."""
        if self.closed:
            raise RuntimeError("this pipeline was closed by rank 0; load it again to make "
                               "more calls")
        self._count += 1
        key = self._key(self._count)
        while True:
            try:
                self._store.wait([key], _IDLE_CHUNK)
                break
            except dist.DistStoreError:  # the wait's own time limit: rank 0 is idle
                continue
            except dist.DistNetworkError as exc:
                raise RankError(f"lost the job's store while waiting for rank 0's next call: "
                                f"rank 0 or the launcher is gone ({exc})") from exc
        kind = self._store.get(key).decode()
        # the last reader deletes the key. Not rank 0 at its next call: a call can end on
        # rank 0 (an empty stream, a refused input) before the last rank has even read it
        if self._store.add(f"{key}/read", 1) == self._readers:
            self._store.delete_key(key)
            self._store.delete_key(f"{key}/read")
        self.closed = kind == CLOSE
        return kind

    def expect(self, kind: str) -> None:
        """Ranks other than 0, at the start of a `kind` call: fail at once, naming both,
        if rank 0 makes another."""
        got = self.next_call()
        if got != kind:
            what = "closed the pipeline" if got == CLOSE else f"called {got}"
            raise RuntimeError(f"this rank called {kind} but rank 0 {what}: every rank must "
                               f"make the same calls in the same order (or run pipe.serve() "
                               f"on the ranks other than 0)")

    def _key(self, n: int) -> str:
        return f"{self._prefix}{n}"
