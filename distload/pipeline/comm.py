"""Point-to-point transport between pipeline stages.

Activations go forward (rank r → r + 1), results come back (last rank → rank 0). A
tensor's shape and dtype are never sent: rank 0 broadcasts the call's setup once
(`broadcast_call`: batch, lengths, micro-batch sizes, mask), and every rank derives each
message's shape from it and the model config (`hidden_size`, `vocab_size`) and the dtype
from the plan (`activation_dtype`). Generation adds one small fixed-size header per step
(`schedule.StepHeader`), because which rows continue is decided on rank 0 as tokens come
back.

Sends are asynchronous (`Outbox`): a rank hands its output to the next and goes on with
its next micro-batch while the transfer runs. Receives are posted ahead (`post_recv`)
where the shape is known, so a transfer overlaps the receiver's compute too. Every wait
is bounded by the process group's timeout (`distload.load(timeout_s=...)`); a peer that
dies closes its connections, which fails the waits on it at once.

Example (every rank; rank 0 sends, rank 1 receives)::

    out = Outbox()
    if world.rank == 0:
        out.send(hidden, dst=1, tag=TAG_ACTIVATION)
    else:
        hidden = post_recv((b, t, h), dtype, world.device, src=0, tag=TAG_ACTIVATION).wait()
    out.wait()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..checkpoint.types import dtype_from_name
from ..dist import World, run_on_rank0
from ..errors import RankError
from ..plan.types import LoadPlan

__all__ = [
    "TAG_ACTIVATION", "TAG_HEADER", "TAG_RESULT", "Outbox", "Inbound", "post_recv",
    "activation_dtype", "broadcast_call",
]

T = TypeVar("T")

TAG_ACTIVATION, TAG_HEADER, TAG_RESULT = 1, 2, 3
_EMBED = "model.embed_tokens.weight"


class Outbox:
    """Asynchronous sends whose tensors are kept alive until the transfer completes.

    Any rank that sends uses one per call: `send` as outputs are ready, `wait` before
    returning (so no transfer outlives the call).
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Any, torch.Tensor, int]] = []

    def send(self, tensor: torch.Tensor, *, dst: int, tag: int) -> None:
        tensor = tensor.contiguous()
        self._pending.append((dist.isend(tensor, dst=dst, tag=tag), tensor, dst))
        if len(self._pending) > 8:  # let finished sends (and their tensors) go
            self._pending = [p for p in self._pending if not p[0].is_completed()]

    def wait(self) -> None:
        """Wait until every send has been delivered; a peer that failed raises
        `RankError` naming it."""
        pending, self._pending = self._pending, []
        for work, _, dst in pending:
            try:
                work.wait()
            except RuntimeError as exc:
                raise RankError(f"could not send to rank {dst}: it failed or stopped "
                                f"(see its own error); {exc}") from exc


class Inbound:
    """A posted receive: `wait()` returns the filled buffer. A peer that failed (its
    connection closed, or the group's timeout passed) raises `RankError` naming it."""

    def __init__(self, buffer: torch.Tensor, work: Any, src: int = -1) -> None:
        self.buffer, self._work, self._src = buffer, work, src

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError as exc:
                raise RankError(f"no data from rank {self._src}: it failed or stopped "
                                f"(see its own error); {exc}") from exc
            self._work = None
        return self.buffer


def post_recv(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, src: int,
              tag: int) -> Inbound:
    """Post a receive of a `shape`/`dtype` tensor from `src` now; wait on it later.
    Receives from one source with one tag complete in the order they were posted."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    return Inbound(buffer, dist.irecv(buffer, src=src, tag=tag), src)


def activation_dtype(plan: LoadPlan) -> torch.dtype:
    """The dtype of the hidden states (and logits) every stage exchanges: the embedding's
    dtype after any cast, which every rank reads from the shared plan."""
    if plan.dtype is not None:
        return dtype_from_name(plan.dtype)
    for stage in plan.stages:
        for src in stage.params:
            if src.param == _EMBED:
                return dtype_from_name(src.dtype)
    raise ValueError(f"the plan has no {_EMBED}; cannot tell the activation dtype")


def broadcast_call(world: World, make: Callable[[], T]) -> T:
    """Rank 0 runs `make()` (validating its arguments, building the call's setup); every
    rank returns the same object, or raises rank 0's error (`RankError` on the others).
    One broadcast over the control group per call. Every rank calls it."""
    return run_on_rank0(world, make)
