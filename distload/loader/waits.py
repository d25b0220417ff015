"""Waits within a load, bounded by limits that scale with the work.

A load's long waits are ranks waiting for each other at the points where they agree:
after every rank read its stage, and after the cpu/disk tiers are attached (the wait for
each node's download has its own keys, `distload.loader.fetch`: no limit while the
leaders live). A process group's timeout is fixed when it is made (and NCCL's watchdog
kills a job whose ranks finish reading more than that apart), so before each of those
collectives every rank first says on the job's board that it arrived and waits there for
the others (`wait_for_ranks`); the collective that follows finds everyone present. The
tied exchange comes right after the wait that follows reading, so the process group's
timeout bounds only its transfer, never another rank's reading.

The limit of a wait is `work_limit`: the bytes the slowest rank has to move at a
pessimistic ``MIN_RATE`` (10 MB/s), and never less than ``FLOOR_SECONDS`` (600 s, the
former fixed limit); ``--timeout`` (``timeout_s``) overrides it. A wait that runs out
names the late ranks and what each was doing (from its state on the board: phase, file,
bytes read, how long since it last read anything), and the late rank, when it arrives,
says that the others gave up on it. A rank that dies is noticed while the others wait: at
once on its own host (its process is gone), or by rank 0 when its heartbeat stops for
``DEAD_SECONDS`` (60 s); every rank then stops, naming it.

Example (every rank)::

    wait_for_ranks(board, world, "read", nbytes=max(s.tensor_bytes for s in plan.stages),
                   override=timeout_s, what="reading", plan=plan)
    agree(world, error)                # everyone is there: no group timeout to fear
"""

from __future__ import annotations

import time

from ..dist import DEFAULT_TIMEOUT_S, STORE_POLL_S, peers_gone
from ..errors import LoadError, RankError
from .board import JobBoard
from .progress import stage_label

__all__ = ["work_limit", "wait_for_ranks", "FLOOR_SECONDS", "MIN_RATE", "DEAD_SECONDS"]

FLOOR_SECONDS = DEFAULT_TIMEOUT_S   # the least a wait allows: the fixed limit it replaced
MIN_RATE = 10e6   # bytes/s a rank moves at the least (a busy network filesystem, a cold disk)
DEAD_SECONDS = 60.0  # a rank whose state (reads, heartbeat) has not changed this long is dead


def work_limit(nbytes: int, *, override: float | None = None) -> float:
    """Seconds a rank waits for others that move `nbytes` (the most any rank moves)."""
    if override is not None:
        return float(override)
    return max(FLOOR_SECONDS, nbytes / MIN_RATE)


def _describe(board: JobBoard, rank: int, plan) -> str:
    state = board.state(rank)
    if not state:
        return f"rank {rank} has not started"
    parts = [f"rank {rank} is {state.get('phase', '?')}"]
    if state.get("file"):
        parts.append(f"file {state['file']}")
    if state.get("total"):
        parts.append(f"{state.get('bytes', 0) / 1e6:.1f} of {state['total'] / 1e6:.1f} MB read")
    if state.get("t"):
        parts.append(f"last heard of {time.time() - float(state['t']):.0f} s ago")
    if plan is not None:
        parts.append(f"stage {stage_label(plan, rank)}")
    return ", ".join(parts)


class _Liveness:
    """Rank 0, while it waits: the ranks whose state has not changed (no read, no
    heartbeat) for `DEAD_SECONDS` — dead on a node whose launcher did not end the job, or
    hung."""

    def __init__(self, board: JobBoard) -> None:
        self.board = board
        self.seen: dict[int, tuple] = {}   # rank -> (beat, when it last changed)

    def silent(self, now: float) -> list[int]:
        out = []
        for r, state in enumerate(self.board.states()):
            if r == self.board.rank or state.get("phase") in ("waiting", "done"):
                continue
            beat = state.get("beat")
            if r not in self.seen or self.seen[r][0] != beat:
                self.seen[r] = (beat, now)
            elif now - self.seen[r][1] > DEAD_SECONDS:
                out.append(r)
        return out


def wait_for_ranks(board: JobBoard, world, point: str, *, nbytes: int, override: float | None,
                   what: str, plan=None) -> None:
    """Every rank: mark this rank arrived at `point` and wait for all the others, at most
    `work_limit(nbytes, override=override)` seconds (`nbytes`: the most any rank moves
    before it arrives). Raises `LoadError` naming the late ranks (`what` they should be
    done with, and what each is doing), or, on a rank that arrives after another gave up
    on it, that rank's message; `RankError` when a rank died (one of this host's processes
    is gone, or, seen by rank 0, a rank's heartbeat stopped). Nothing in a world of one.

    Polls the point's arrival count at growing intervals (1 ms to 0.25 s: a wait ends at
    most ~twice as late as its ranks arrive, never more than 0.25 s late), and once a
    second looks for a rank that gave up or died. A blocking store wait could not be
    interrupted by a signal (Ctrl-C), nor notice a dead peer."""
    if not world.distributed:
        return
    gave_up = board.aborted()
    if gave_up is not None:
        raise LoadError(f"the other ranks stopped waiting for this one: {gave_up}")
    board.arrive(point)
    limit = work_limit(nbytes, override=override)
    start = look = time.monotonic()
    pause = 0.001
    others = [r for r in range(world.world_size) if r != world.rank]
    liveness = _Liveness(board) if world.is_first else None
    while board.count(point) < world.world_size:
        now = time.monotonic()
        if now - start >= limit:
            _late(board, world, board.missing(point), limit=limit, nbytes=nbytes, override=override,
                  what=what, plan=plan)
        if now - look >= 1.0:
            look = now
            _look_around(board, others, liveness, now, what=what)
        time.sleep(min(pause, max(limit - (now - start), 0.001)))
        pause = min(2 * pause, STORE_POLL_S)


def _look_around(board: JobBoard, others: list[int], liveness: _Liveness | None, now: float, *,
                 what: str) -> None:
    """Raise if another rank gave up, or a rank died."""
    message = board.aborted()
    if message is not None:
        raise RankError(message)
    gone = peers_gone(others)
    if gone:
        message = f"rank {', '.join(map(str, gone))} died (connection lost) during loading"
    else:
        silent = liveness.silent(now) if liveness is not None else []
        if not silent:
            return
        message = (f"rank {', '.join(map(str, silent))} has not been heard of for {DEAD_SECONDS:.0f} s "
                   f"while {what}: it died or hangs")
    board.abort(message)
    raise RankError(message)


def _late(board: JobBoard, world, missing: list[int], *, limit: float, nbytes: int,
          override: float | None, what: str, plan) -> None:
    how = ("--timeout" if override is not None else
           f"the limit for {nbytes / 1e9:.2f} GB at {MIN_RATE / 1e6:.0f} MB/s, at least "
           f"{FLOOR_SECONDS:.0f} s; --timeout sets another")
    late = "; ".join(_describe(board, r, plan) for r in missing)
    message = f"rank {', '.join(map(str, missing))} not done {what} after {limit:.3g} s ({how}): {late}"
    board.abort(f"rank {world.rank}: {message}")
    raise LoadError(message)
