"""Point-to-point transport between pipeline stages.

Activations go down the ranks (r → r + 1, over the default group); results come back
(last rank → rank 0, over `World.return_group`, so that at two ranks a result never waits
behind the next activations on NCCL's one stream per pair). A tensor's shape and dtype
are never sent: each message is announced by a small fixed-size header ahead of it
(`messages.ForwardHeader`, `messages.StepHeader`), and every rank derives the shapes from
it and the model config (`hidden_size`, `vocab_size`) and the dtype from the plan
(`LoadPlan.activation_dtype`). No tags: NCCL ignores them and matches a pair's messages in the
order they were posted, so every receiver posts its receives in exactly the order the
sender sends; gloo, matching untagged messages in order too, holds the CPU tests to the
same rule.

Sends are asynchronous (`Outbox`): a rank hands its output to the next and goes on with
its next micro-batch while the transfer runs; past 16 sends in flight it waits on the
oldest, so a long call holds a bounded number of sent tensors. Receives are posted ahead (`post_recv`)
where the shape is known and no send of the rank's has to pass them (NCCL runs a rank's
sends and receives of one group on one stream in post order: see the schedules). Every
wait is bounded by the process group's timeout (`distload.load(timeout_s=...)`); a peer
that dies closes its connections, which fails the waits on it at once.

On a device (NCCL), `work.wait()` only orders the current stream after the transfer and
returns at once; a dead peer would surface as a hang in the next `.tolist()` until NCCL's
watchdog aborts the process. So waits on device tensors block the host (`_host_wait`):
they poll the transfer, name a peer whose process is gone, and give up before the
watchdog would, with a `RankError` naming the rank, and the trace's wait spans are real.

Example (every rank; rank 0 sends, rank 1 receives)::

    out = Outbox()
    if world.rank == 0:
        out.send(hidden, dst=1)
    else:
        hidden = post_recv((b, t, h), dtype, world.device, src=0).wait()
    out.wait()
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .. import trace
from ..dist import World, group_timeout_s, lost_peer, peers_gone, run_on_rank0
from ..errors import CallAborted, RankError

__all__ = ["Outbox", "Inbound", "post_recv", "recv_into", "broadcast_call"]

T = TypeVar("T")


_GIVE_UP = 0.9      # of the group's timeout, counted from the post: before the watchdog
_CHECK_PEERS_S = 0.5  # how often a host wait looks for a dead peer
_MAX_PENDING = 16   # sends an Outbox keeps in flight (a stream's two batches of micro-batches)


class _Unanswered(RuntimeError):
    """What `_host_wait` found itself (a peer's process gone, the deadline passed): said as
    it is, where a transport error goes through `dist.lost_peer`."""


def _host_wait(work: Any, tensor: torch.Tensor, peer: int, posted: float) -> None:
    """Return once `work` (a transfer of `tensor` with global rank `peer`, posted at
    `posted`, monotonic) has completed; raise RuntimeError if it failed, if `peer`'s
    process is gone, or at `_GIVE_UP` of the group's timeout. On the CPU (gloo)
    `work.wait()` already blocks the host and fails on a lost connection."""
    if tensor.device.type == "cpu":
        work.wait()
        return
    deadline = posted + _GIVE_UP * group_timeout_s()
    pause, next_check = 2e-5, time.monotonic() + _CHECK_PEERS_S
    # Polling, not a blocking CUDA event: the host must stay free to notice a dead peer
    # (NCCL never does for P2P) and the deadline. Sleeps grow to 0.2 ms: a wait ends at
    # most that late (a decode step on a GPU stage takes milliseconds), and a waiting
    # rank wakes 5000 times a second, a small share of a core.
    while not work.is_completed():
        now = time.monotonic()
        if now >= next_check:
            next_check = now + _CHECK_PEERS_S
            if peers_gone([peer]):
                raise _Unanswered(f"rank {peer}'s process is gone")
        if now >= deadline:
            raise _Unanswered(f"no answer in {now - posted:.0f} s (the process group's "
                               f"timeout is {group_timeout_s():.0f} s)")
        time.sleep(pause)
        pause = min(2 * pause, 2e-4)
    work.wait()  # raises the transfer's own error; orders the current stream after it


class Outbox:
    """Asynchronous sends whose tensors are kept alive until the transfer completes.

    Any rank that sends uses one per call: `send` as outputs are ready, `wait` before
    returning (so no transfer outlives the call).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Any, torch.Tensor, int, float]] = []

    def send(self, tensor: torch.Tensor, *, dst: int, group: Any = None) -> None:
        """Send `tensor` to global rank `dst` over `group` (None: the default group)."""
        tensor = tensor.contiguous()
        try:  # gloo fails at once when the peer's connection is already closed
            work = dist.isend(tensor, dst=dst, group=group)
        except RuntimeError as exc:
            raise lost_peer(exc, f"a pipelined call (sending to rank {dst})", peer=dst) from exc
        self._pending.append((work, tensor, dst, time.monotonic()))
        if len(self._pending) > _MAX_PENDING:  # let finished sends (and their tensors) go
            self._pending = [p for p in self._pending if not p[0].is_completed()]
            # gloo calls a send complete only once waited on: without this, a long stream
            # or generation kept every tensor it sent alive to the end of the call. The
            # oldest has normally been delivered long ago (its receiver posts in order)
            while len(self._pending) > _MAX_PENDING:
                self._wait_one(*self._pending.pop(0))

    def wait(self) -> None:
        """Wait until every send has been delivered; a peer that failed raises
        `RankError` naming it."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        with trace.span("send wait", "comm", sends=len(pending)):
            for item in pending:
                self._wait_one(*item)

    @staticmethod
    def _wait_one(work: Any, tensor: torch.Tensor, dst: int, posted: float) -> None:
        try:
            _host_wait(work, tensor, dst, posted)
        except _Unanswered as exc:
            raise RankError(f"could not send to rank {dst}: {exc}") from exc
        except RuntimeError as exc:
            raise lost_peer(exc, f"a pipelined call (sending to rank {dst})", peer=dst) from exc


class Inbound:
    """A posted receive: `wait()` returns the filled buffer. A peer that failed (its
    connection closed, or the group's timeout passed) raises `RankError` naming it."""

    def __init__(self, buffer: torch.Tensor, work: Any, src: int = -1) -> None:
        self.buffer, self._work, self._src = buffer, work, src
        self._posted = time.monotonic()

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            with trace.span("recv wait", "comm", src=self._src, shape=list(self.buffer.shape)):
                try:
                    _host_wait(self._work, self.buffer, self._src, self._posted)
                except _Unanswered as exc:
                    raise RankError(f"no data from rank {self._src}: {exc}") from exc
                except RuntimeError as exc:
                    raise lost_peer(exc, f"a pipelined call (receiving from rank {self._src})",
                                    peer=self._src) from exc
            self._work = None
        return self.buffer


def post_recv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, src: int,
              group: Any = None) -> Inbound:
    """Post a receive of a `shape`/`dtype` tensor from global rank `src` over `group` now;
    wait on it later. Receives from one source complete in the order they were posted."""
    return recv_into(torch.empty(shape, dtype=dtype, device=device), src=src, group=group)


def recv_into(buffer: torch.Tensor, *, src: int, group: Any = None) -> Inbound:
    """Post a receive into `buffer` (contiguous: e.g. a row range of a larger result, so
    that pieces arrive in place and need no concatenation after)."""
    if not buffer.is_contiguous():
        raise ValueError("a receive buffer must be contiguous")
    try:
        work = dist.irecv(buffer, src=src, group=group)
    except RuntimeError as exc:
        raise lost_peer(exc, f"a pipelined call (receiving from rank {src})", peer=src) from exc
    return Inbound(buffer, work, src)


def broadcast_call(world: World, make: Callable[[], T] | None) -> T:
    """Rank 0 runs `make()` (validating its arguments, building the call's setup; the
    others pass None); every
    rank returns the same object, or raises rank 0's error (`CallAborted` on the others:
    the pipeline is still usable). One broadcast over the control group per call. Every
    rank calls it."""
    try:
        return run_on_rank0(world, make)
    except RankError as exc:
        raise CallAborted(str(exc)) from exc
