"""`Pipeline`: what `distload.load` returns on every rank — the rank's stage, the shared
plan, the load report, the pipelined `forward` / `forward_stream` / `generate`, and
`serve` / `close` for launchers whose rank 0 alone decides what runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..dist import World
from ..checkpoint.dtypes import dtype_from_name
from ..offload.stream import streamer_of
from ..plan.types import LoadPlan
from .calls import CLOSE, CallChannel
from .figures import share_figures
from .schedules import get_schedule

__all__ = ["Pipeline"]


@dataclass
class Pipeline:
    """One rank's view of a loaded, pipelined model.

    Example (under ``torchrun --nproc_per_node=2``)::

        pipe = distload.load("demo")
        logits = pipe.forward(torch.tensor([[1, 2, 3]]))   # a tensor on rank 0, None elsewhere
    """

    module: nn.Module
    plan: LoadPlan
    report: dict          # this rank's figures
    job_report: dict      # every rank's figures (the JSON of --report; current on rank 0, see `figures`)
    world: World
    root: str = ""        # the checkpoint's directory on this rank's node
    micro_batches: int | None = None
    calls: CallChannel | None = field(default=None, repr=False)  # None in a world of one
    open_stream: bool = field(default=False, repr=False)  # rank 0: a forward_stream is running
    # rank 0: the timings of the last `generate` (see `schedules.ring_decode._Driver.run`)
    last_call: dict = field(default_factory=dict, repr=False)
    closed: bool = field(default=False, repr=False)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        # after an error on this rank, do not wait for rank 0's word: it may never come
        self.close(wait=exc is None)

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def rank(self) -> int:
        return self.world.rank

    # ------------------------------------------------------------------ for the schedules
    @property
    def hidden_size(self) -> int:
        """Width of the activations the stages exchange: the stage contract's
        `message_width` (the hidden size, unless a family sends side inputs beside it)."""
        width = getattr(self.module, "message_width", None)
        return int(width if width is not None else self.module.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.module.config.vocab_size)

    @property
    def max_positions(self) -> int | None:
        """Positions a call may use: the stage contract's `max_positions` (a learned
        position table's length, GPT-2's); None: no such limit."""
        return self.module.max_positions

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of the hidden states (and logits) every stage exchanges."""
        return dtype_from_name(self.plan.activation_dtype)

    def check_idle(self) -> None:
        """Rank 0, before any call: the ranks downstream must not be serving an unfinished
        stream, or they would take this call's messages for its next batch."""
        if self.open_stream:
            raise RuntimeError("a forward_stream is still open on rank 0: iterate it to the end "
                               "or close() it before the next call")

    def start_call(self, name: str) -> None:
        """The first step of every call of schedule `name`: rank 0 announces it, the
        other ranks check that rank 0 announced the same (see `calls`). Nothing in a world
        of one."""
        if self.calls is None:
            return
        if self.world.is_first:
            self.check_idle()
            self.calls.announce(name)
        else:
            self.calls.expect(name)

    def run(self, schedule: str, *args, **kwargs):
        """Run the registered schedule `schedule` (every rank; rank 0's result, None
        elsewhere). `forward`, `forward_stream` and `generate` are its named cases."""
        result = get_schedule(schedule).run(self, *args, **kwargs)
        if isinstance(result, Iterator):   # a stream: the call ends with its last batch
            return self._then_share(result)
        share_figures(self)
        return result

    def _then_share(self, stream: Iterator) -> Iterator:
        yield from stream
        share_figures(self)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                *, micro_batches: int | None = None) -> torch.Tensor | None:
        """Logits for `input_ids` [B, T] on rank 0 (None on other ranks). Every rank calls
        it; ranks other than 0 may pass None."""
        return self.run("forward", input_ids, attention_mask,
                        micro_batches=micro_batches or self.micro_batches)

    def forward_stream(self, batches=None, *, micro_batches: int | None = None):
        """Logits of many batches, the pipeline kept full across them (a batch job): an
        iterator that every rank runs to the end. On rank 0 `batches` yields
        ``input_ids`` or ``(input_ids, attention_mask)`` and the iterator yields each
        batch's logits in order; elsewhere it yields None once per batch.

        Example::

            for logits in pipe.forward_stream(batches if pipe.rank == 0 else None):
                if logits is not None:
                    save(logits)
        """
        return self.run("forward_stream", batches, micro_batches=micro_batches or self.micro_batches)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 *, max_new_tokens: int = 32, micro_batches: int | None = None,
                 group_size: int | None = None, **sampling) -> torch.Tensor | None:
        """Generated token ids [B, T + new] on rank 0 (None on other ranks). Every rank
        calls it; ranks other than 0 may pass None. `micro_batches` sequence groups are
        in flight; `group_size` caps a group's sequences (more groups then take turns)."""
        return self.run("generate", input_ids, attention_mask, max_new_tokens=max_new_tokens,
                        micro_batches=micro_batches or self.micro_batches, group_size=group_size,
                        **sampling)

    def serve(self) -> int:
        """Ranks other than 0: take part in every call rank 0 makes, idle between calls
        for as long as rank 0 is, until rank 0 calls `close()`; returns how many calls
        were served. For launchers whose rank 0 alone decides what to run (see
        `distload.pipeline.serve`)."""
        from .serve import serve

        return serve(self)

    def close(self, *, wait: bool = True) -> None:
        """End this pipeline on this rank; every rank should, and rank 0 must if the others
        `serve()`. Rank 0 tells the others there are no more calls (their `serve()`
        returns); another rank waits for that word (unless `serve()` already got it, or
        `wait` is false, as after an error). Then its offload streaming stops (its
        prefetch thread joined). Calling it again does nothing; ``with distload.load(...)
        as pipe:`` closes on leaving. The process group stays joined for a later `load`
        until the interpreter exits: distload leaves it then (`distload.dist`), so a
        script needs no call of its own to end cleanly.

        Example::

            with distload.load("demo") as pipe:
                tokens = pipe.generate(ids, max_new_tokens=8)
        """
        if self.closed:
            return
        self.closed = True
        try:
            if self.calls is not None and not self.calls.closed:
                if self.world.is_first:
                    self.calls.announce(CLOSE)
                elif wait:
                    self.calls.expect(CLOSE)
        finally:
            streamer = streamer_of(self.module)
            if streamer is not None:
                streamer.close()
