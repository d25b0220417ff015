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
its next micro-batch while the transfer runs. Receives are posted ahead (`post_recv`)
where the shape is known, so a transfer overlaps the receiver's compute too. Every wait
is bounded by the process group's timeout (`distload.load(timeout_s=...)`); a peer that
dies closes its connections, which fails the waits on it at once.

Example (every rank; rank 0 sends, rank 1 receives)::

    out = Outbox()
    if world.rank == 0:
        out.send(hidden, dst=1)
    else:
        hidden = post_recv((b, t, h), dtype, world.device, src=0).wait()
    out.wait()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .. import trace
from ..dist import World, lost_peer, run_on_rank0
from ..errors import CallAborted, RankError

__all__ = ["Outbox", "Inbound", "post_recv", "broadcast_call"]

T = TypeVar("T")


class Outbox:
    """Asynchronous sends whose tensors are kept alive until the transfer completes.

    Any rank that sends uses one per call: `send` as outputs are ready, `wait` before
    returning (so no transfer outlives the call).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Any, torch.Tensor, int]] = []

    def send(self, tensor: torch.Tensor, *, dst: int, group: Any = None) -> None:
        """Send `tensor` to global rank `dst` over `group` (None: the default group)."""
        tensor = tensor.contiguous()
        try:  # gloo fails at once when the peer's connection is already closed
            work = dist.isend(tensor, dst=dst, group=group)
        except RuntimeError as exc:
            raise lost_peer(exc, f"a pipelined call (sending to rank {dst})", peer=dst) from exc
        self._pending.append((work, tensor, dst))
        if len(self._pending) > 8:  # let finished sends (and their tensors) go
            self._pending = [p for p in self._pending if not p[0].is_completed()]

    def wait(self) -> None:
        """Wait until every send has been delivered; a peer that failed raises
        `RankError` naming it."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        with trace.span("send wait", "comm", sends=len(pending)):
            for work, _, dst in pending:
                try:
                    work.wait()
                except RuntimeError as exc:
                    raise lost_peer(exc, f"a pipelined call (sending to rank {dst})", peer=dst) from exc


class Inbound:
    """A posted receive: `wait()` returns the filled buffer. A peer that failed (its
    connection closed, or the group's timeout passed) raises `RankError` naming it."""

    def __init__(self, buffer: torch.Tensor, work: Any, src: int = -1) -> None:
        self.buffer, self._work, self._src = buffer, work, src

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            with trace.span("recv wait", "comm", src=self._src, shape=list(self.buffer.shape)):
                try:
                    self._work.wait()
                except RuntimeError as exc:
                    raise lost_peer(exc, f"a pipelined call (receiving from rank {self._src})",
                                    peer=self._src) from exc
            self._work = None
        return self.buffer


def post_recv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, src: int,
              group: Any = None) -> Inbound:
    """Post a receive of a `shape`/`dtype` tensor from global rank `src` over `group` now;
    wait on it later. Receives from one source complete in the order they were posted."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
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
