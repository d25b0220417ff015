"""The streamed forward (schedule ``forward_stream``): logits of batches, streamed through
the stages in micro-batches, the pipeline kept full across batches.

GPipe's forward-only schedule. Rank 0 embeds and runs its layers on micro-batch 0, sends
the hidden states to rank 1 and goes straight on to micro-batch 1 while rank 1 works on
0, and so on down the ranks; the last rank applies the norm and the head and sends each
micro-batch's logits back to rank 0. With M micro-batches and P stages of equal cost one
call takes (M + P - 1) stage-steps instead of the M * P of running the stages one after
the other: a speed-up of at most P * M / (M + P - 1) (1.6 at P = 2, M = 4), because the
pipeline fills and drains once per call.

`pipeline_forward_stream` takes many batches (a batch job) and keeps the pipeline full
across them: rank 0 starts batch k + 1 before it hands back batch k's logits, so it
fills and drains once per stream, and the speed-up tends to P for balanced stages.
The ``forward`` schedule (`gpipe.py`) is a stream of one batch.

Each batch is announced down the ranks by a `ForwardHeader` (its size, micro-batches and
whether an attention mask follows), sent ahead of its data, so no rank waits on a round
trip to learn a shape. A bad batch on rank 0 (invalid ids, or its iterator raising) is
announced with an ABORT header carrying the error: every rank raises it (`CallAborted`
on the others) after the batches before it are through, and the pipeline stays usable.
A stage that raises mid-batch ends its process; the ranks waiting on it raise
`RankError` when its connection closes (or after the process group's timeout).

Who calls what: every rank calls `pipeline_forward_stream` (through
`Pipeline.forward_stream`), or the ranks after the first run `follow_forward` from
`Pipeline.serve` once rank 0 has announced the call (`calls`); only rank 0's inputs are
used (others pass None) and only rank 0 gets logits.

Example (under ``torchrun --nproc_per_node=2``)::

    pipe = distload.load("demo")
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])          # left padded
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    logits = pipe.forward(ids, mask, micro_batches=2)        # [2, 4, vocab] on rank 0
    for logits in pipe.forward_stream([ids, (ids, mask)] if pipe.rank == 0 else None):
        ...                                                  # rank 0: each batch's logits
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

import torch

from ... import trace
from ...errors import CallAborted, RankError
from ...log import logger
from ..comm import Inbound, Outbox, post_recv, recv_into
from ..inputs import check_positions, validate_inputs
from ..messages import ABORT, BATCH, END, ForwardHeader
from ..microbatch import micro_batch_slices, position_ids_from_mask
from .registry import Schedule, register_schedule

__all__ = ["pipeline_forward_stream", "stream_batches", "batches_in_flight", "follow_forward"]

NAME = "forward_stream"

_MAX_MESSAGE = 4096  # bytes of rank 0's error carried by an ABORT header


def batches_in_flight(stages: int, micro_batches: int) -> int:
    """How many batches rank 0 keeps in the pipeline at once: enough micro-batches to give
    every stage work (at least `stages`), counting the one rank 0 is running."""
    return 1 + math.ceil((stages - 1) / max(1, micro_batches))


def pipeline_forward_stream(pipe, batches: Iterable | None, *,
                            micro_batches: int | None = None) -> Iterator[torch.Tensor | None]:
    """Every rank iterates it. On rank 0, `batches` yields ``input_ids`` tensors, or
    ``(input_ids, attention_mask)`` pairs, or mappings with those keys, read one at a
    time as the pipeline has room; the stream yields each batch's logits in order. On
    the other ranks `batches` is ignored and the stream yields None once per batch.

    Rank 0 stops the stream by running out of batches, or by leaving the loop early (the
    batches already started are finished and dropped), so every rank's loop ends.
    """
    return stream_batches(pipe, batches, micro_batches=micro_batches, name=NAME)


def stream_batches(pipe, batches: Iterable | None, *, micro_batches: int | None, name: str
                   ) -> Iterator[torch.Tensor | None]:
    """The stream as the call `name` (what rank 0 announces, and the others expect)."""
    world = pipe.world
    micro_batches = micro_batches or world.world_size
    if not world.distributed:
        return _lead_local(pipe, batches, micro_batches)
    if world.is_first:
        pipe.check_idle()
        return _Lead(pipe, micro_batches, name).run(batches)
    return _follow(pipe, name)


def _unpack(item) -> tuple:
    if isinstance(item, Mapping):
        return item.get("input_ids"), item.get("attention_mask")
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise ValueError(f"a batch must be input_ids or (input_ids, attention_mask); got a "
                             f"{type(item).__name__} of {len(item)} items")
        return tuple(item)
    return item, None


def _batches(batches) -> Iterator:
    """The items of `batches`; a generator, so a wrong argument raises at the first batch,
    where rank 0 tells the others."""
    if isinstance(batches, torch.Tensor) or batches is None:
        got = "None" if batches is None else "one tensor"
        raise TypeError(f"forward_stream needs an iterable of batches on rank 0, got {got}; "
                        f"for a single batch call forward(input_ids)")
    yield from batches


def _prepare(item, vocab: int, max_positions: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids, mask = validate_inputs(*_unpack(item), vocab)
    check_positions(ids.shape[1], max_positions, "a batch of input_ids needs")
    if mask is not None and bool(mask.all()):
        mask = None  # nothing to mask: plain causal attention
    return ids, mask


@torch.no_grad()
def _run(module, x: torch.Tensor, mask: torch.Tensor | None, rows: slice, index: int = 0) -> torch.Tensor:
    """This rank's stage on the micro-batch `rows` (number `index` of its batch; mask on
    the stage's device, or None)."""
    length = x.shape[1]
    with trace.span("forward", "pipeline", micro_batch=index, rows=f"{rows.start}-{rows.stop}",
                    tokens=length):
        if mask is None:
            positions = torch.arange(length, device=x.device).expand(x.shape[0], length)
            return module(x, position_ids=positions, attention_mask=None)
        mask = mask[rows]
        return module(x, position_ids=position_ids_from_mask(mask), attention_mask=mask)


def _lead_local(pipe, batches: Iterable, micro_batches: int) -> Iterator[torch.Tensor]:
    """World of one: each batch's micro-batches one after the other (the same numerics)."""
    vocab, device = pipe.vocab_size, pipe.world.device
    for item in _batches(batches):
        ids, mask = _prepare(item, vocab, pipe.max_positions)
        ids, mask = ids.to(device), None if mask is None else mask.to(device)
        outs = [_run(pipe.module, ids[sl], mask, sl, i)
                for i, sl in enumerate(micro_batch_slices(ids.shape[0], micro_batches))]
        yield torch.cat(outs) if len(outs) > 1 else outs[0]


# ----------------------------------------------------------------------------- rank 0

class _Lead:
    """Rank 0: announce each batch, run its micro-batches through stage 0 and send them
    on, post the receives of their logits, and hand back the oldest batch's logits only
    once enough later batches are in the pipeline to keep every stage busy."""

    def __init__(self, pipe, micro_batches: int, name: str) -> None:
        self.pipe, self.name = pipe, name
        self.module, self.world, self.micro_batches = pipe.module, pipe.world, micro_batches
        self.vocab = pipe.vocab_size
        self.dtype = pipe.activation_dtype
        self.depth = batches_in_flight(self.world.world_size, micro_batches)
        self.outbox = Outbox()
        # per batch in flight: its logits and the receives filling their row ranges
        self.inflight: deque[tuple[torch.Tensor, list[Inbound]]] = deque()

    def run(self, batches: Iterable) -> Iterator[torch.Tensor]:
        items, ended = _batches(batches), False
        self.pipe.start_call(self.name)
        self.pipe.open_stream = True
        try:
            while True:
                try:
                    ids, mask = _prepare(next(items), self.vocab, self.pipe.max_positions)
                except StopIteration:
                    break
                except Exception as exc:
                    self._abort(exc)
                    raise
                self._start(ids, mask)
                if len(self.inflight) >= self.depth:
                    yield self._collect()
            self._send(ForwardHeader(END))
            ended = True
            while self.inflight:
                yield self._collect()
            self.outbox.wait()
        except GeneratorExit:  # the caller left the loop: finish what was started
            if not ended:
                self._send(ForwardHeader(END))
            self._drain()
            raise
        finally:
            self.pipe.open_stream = False

    def _start(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        device, last = self.world.device, self.world.world_size - 1
        batch, length = ids.shape
        slices = micro_batch_slices(batch, self.micro_batches)
        logger.debug("forward: batch %d x %d tokens in %d micro-batches", batch, length,
                     len(slices))
        self._send(ForwardHeader(BATCH, batch, length, len(slices), mask is not None))
        if mask is not None:
            mask = mask.to(device)
            self.outbox.send(mask, dst=1)
        # each micro-batch's logits land in their rows of the batch's: no concatenation on
        # rank 0's critical path (16 MB per call at the bench's sizes)
        logits = torch.empty((batch, length, self.vocab), dtype=self.dtype, device=device)
        self.inflight.append((logits, [recv_into(logits[sl], src=last, group=self.world.return_group)
                                       for sl in slices]))
        ids = ids.to(device)
        for i, sl in enumerate(slices):
            self.outbox.send(_run(self.module, ids[sl], mask, sl, i).to(self.dtype), dst=1)

    def _collect(self) -> torch.Tensor:
        logits, pieces = self.inflight.popleft()
        for piece in pieces:
            piece.wait()
        return logits

    def _send(self, header: ForwardHeader, message: bytes = b"") -> None:
        self.outbox.send(header.encode(self.world.device), dst=1)
        if message:
            self.outbox.send(torch.frombuffer(bytearray(message), dtype=torch.uint8)
                             .to(self.world.device), dst=1)

    def _abort(self, exc: Exception) -> None:
        """Tell every rank that rank 0 failed on this batch, after the batches before it."""
        message = f"{type(exc).__name__}: {exc}".encode()[:_MAX_MESSAGE]
        try:
            self._send(ForwardHeader(ABORT, message_bytes=len(message)), message)
            self._drain()
        except RankError as peer:  # a peer is gone too; rank 0's own error says more
            logger.debug("while stopping the forward stream: %s", peer)

    def _drain(self) -> None:
        while self.inflight:
            self._collect()
        self.outbox.wait()


# ----------------------------------------------------------------------------- ranks 1..P-1

def _follow(pipe, name: str) -> Iterator[None]:
    """Ranks after the first: yield once per batch. A caller that leaves its loop early
    still serves rank 0 to the end of the stream (so rank 0 never waits on it)."""
    pipe.start_call(name)
    batches = follow_forward(pipe)
    try:
        for _ in batches:  # not `yield from`: that would close `batches` with this one
            yield None
    except GeneratorExit:
        for _ in batches:
            pass
        raise


def follow_forward(pipe) -> Iterator[None]:
    """Ranks after the first, in a forward call rank 0 announced. For each batch the
    headers announce: pass the header on, run every micro-batch through the stage and
    send it on (the last rank sends the logits back to rank 0), until END; raise rank 0's
    error on ABORT."""
    world, module = pipe.world, pipe.module
    device, dtype = world.device, pipe.activation_dtype
    hidden, prev = pipe.hidden_size, world.rank - 1
    nxt = None if world.is_last else world.rank + 1
    outbox = Outbox()

    def relay(tensor: torch.Tensor) -> None:
        if nxt is not None:
            outbox.send(tensor, dst=nxt)

    # Post order (NCCL runs one rank's sends and receives of a group on one stream, in the
    # order posted): the header is relayed at once; micro-batch i + 1's receive is posted
    # ahead of micro-batch i's send (rank 0 sends a batch's micro-batches without waiting
    # on anything, so it always comes), and the next header's receive only after the last
    # send. Posting every receive of a batch ahead would hold this rank's sends back until
    # the whole batch and the next header had arrived: no micro-batch pipelining on NCCL.
    while True:
        raw = post_recv((ForwardHeader.LENGTH,), torch.long, device, src=prev).wait()
        header = ForwardHeader.decode(raw)
        if header.kind == END:
            relay(raw)
            outbox.wait()
            return
        if header.kind == ABORT:
            message = post_recv((header.message_bytes,), torch.uint8, device, src=prev).wait()
            relay(raw)
            relay(message)
            outbox.wait()
            raise CallAborted(f"rank 0 failed: {bytes(message.cpu().tolist()).decode(errors='replace')}")
        relay(raw)
        mask = None
        if header.masked:
            mask = post_recv((header.batch, header.length), torch.long, device, src=prev).wait()
            relay(mask)
        slices = micro_batch_slices(header.batch, header.micro_batches)

        def receive(sl: slice) -> Inbound:
            return post_recv((sl.stop - sl.start, header.length, hidden), dtype, device, src=prev)

        act = receive(slices[0])
        for i, sl in enumerate(slices):
            following = receive(slices[i + 1]) if i + 1 < len(slices) else None
            out = _run(module, act.wait(), mask, sl, i).to(dtype)
            if nxt is None:
                outbox.send(out, dst=0, group=world.return_group)
            else:
                outbox.send(out, dst=nxt)
            act = following
        yield None


def _serve(pipe) -> None:
    for _ in follow_forward(pipe):
        pass


register_schedule(Schedule(NAME, pipeline_forward_stream, _serve))
