"""Pipelined forward: logits of a batch, streamed through the stages in micro-batches.

GPipe's forward-only schedule. Rank 0 embeds and runs its layers on micro-batch 0, sends
the hidden states to rank 1 and goes straight on to micro-batch 1 while rank 1 works on
0, and so on down the ranks; the last rank applies the norm and the head and sends each
micro-batch's logits back to rank 0. With M micro-batches and P stages of equal cost a
call takes (M + P - 1) stage-steps instead of the M * P of running the stages one after
the other, so the speed-up is P * M / (M + P - 1).

Who calls what: every rank calls `pipeline_forward` (through `Pipeline.forward`); only rank
0's arguments are used (others may pass None; rank 0 broadcasts the call's setup) and only
rank 0 gets the logits. A rank that fails stops the others: a bad input on rank 0 is raised
on every rank before any transfer; a stage that raises mid-call ends its process, and the
ranks waiting on it raise `RankError` when its connection closes (or after the process
group's timeout).

Example (under ``torchrun --nproc_per_node=2``)::

    pipe = distload.load("demo")
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])          # left padded
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    logits = pipe.forward(ids, mask, micro_batches=2)        # [2, 4, vocab] on rank 0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..log import logger
from .comm import TAG_ACTIVATION, TAG_RESULT, Outbox, activation_dtype, broadcast_call, post_recv
from .schedule import micro_batch_slices, position_ids_from_mask, split_sizes

__all__ = ["pipeline_forward", "validate_inputs"]


@dataclass(frozen=True)
class _ForwardCall:
    """What rank 0 tells every rank once per call; each message's shape follows from it."""

    batch: int
    length: int
    micro_batches: int
    mask: torch.Tensor | None  # [B, T] int64 on the CPU, None: no padding


def validate_inputs(input_ids, attention_mask, vocab_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check rank 0's inputs; return them as int64 CPU tensors (mask None if absent).
    Errors say what to pass instead."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor on rank 0, got "
                        f"{type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, length] with both >= 1, got "
                         f"{tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    input_ids = input_ids.detach().to("cpu", torch.long)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}) for this model; "
                         f"got {low}..{high}")
    if attention_mask is None:
        return input_ids, None
    if not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must match "
                         f"input_ids {tuple(input_ids.shape)}")
    attention_mask = attention_mask.detach().to("cpu", torch.long)
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("every row of attention_mask needs at least one real token (a 1)")
    return input_ids, attention_mask


def _positions(mask: torch.Tensor | None, rows: int, length: int, device) -> torch.Tensor:
    if mask is None:
        return torch.arange(length, device=device).expand(rows, length)
    return position_ids_from_mask(mask.to(device))


def pipeline_forward(pipe, input_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, *,
                     micro_batches: int | None = None) -> torch.Tensor | None:
    """Logits ``[B, T, vocab]`` (the activation dtype, on rank 0's device) of `input_ids`
    ``[B, T]`` on rank 0; None on the other ranks. Every rank calls it.

    `attention_mask` ``[B, T]`` is 1 for real tokens, 0 for (left) padding; positions
    count real tokens only, as in Hugging Face `generate`. `micro_batches` (default: the
    world size, at most B) is how many pieces the batch streams through the stages in.
    """
    world, plan, module = pipe.world, pipe.plan, pipe.module
    vocab = int(plan.config["vocab_size"])
    checked: dict[str, torch.Tensor] = {}  # rank 0's validated ids (not broadcast)

    def make_call() -> _ForwardCall:
        ids, mask = validate_inputs(input_ids, attention_mask, vocab)
        checked["ids"] = ids
        if mask is not None and bool(mask.all()):
            mask = None  # nothing to mask: plain causal attention
        parts = len(split_sizes(ids.shape[0], micro_batches or world.world_size))
        return _ForwardCall(ids.shape[0], ids.shape[1], parts, mask)

    call = broadcast_call(world, make_call)
    logger.debug("forward: batch %d x %d tokens in %d micro-batches", call.batch, call.length,
                 call.micro_batches)
    with torch.no_grad():
        if not world.distributed:
            return _forward_local(module, checked["ids"], call, world.device)
        if world.is_first:
            return _forward_first(module, checked["ids"], call, world, plan)
        _forward_rest(module, call, world, plan)
        return None


def _run(module, x: torch.Tensor, call: _ForwardCall, rows: slice, device) -> torch.Tensor:
    mask = None if call.mask is None else call.mask[rows].to(device)
    positions = _positions(mask, x.shape[0], call.length, device)
    return module(x, position_ids=positions, attention_mask=mask)


def _forward_local(module, input_ids, call: _ForwardCall, device) -> torch.Tensor:
    """World of one: the micro-batches one after the other (the same numerics)."""
    ids = input_ids.to(device)
    outs = [_run(module, ids[sl], call, sl, device)
            for sl in micro_batch_slices(call.batch, call.micro_batches)]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _forward_first(module, input_ids, call: _ForwardCall, world, plan) -> torch.Tensor:
    """Rank 0: post a receive per micro-batch's logits, then embed and run each
    micro-batch and pass it on without waiting for the next rank."""
    device, dtype = world.device, activation_dtype(plan)
    vocab, last = int(plan.config["vocab_size"]), world.world_size - 1
    slices = micro_batch_slices(call.batch, call.micro_batches)
    results = [post_recv((sl.stop - sl.start, call.length, vocab), dtype, device, src=last,
                         tag=TAG_RESULT) for sl in slices]
    ids = input_ids.to(device)
    outbox = Outbox()
    for sl in slices:
        hidden = _run(module, ids[sl], call, sl, device)
        outbox.send(hidden.to(dtype), dst=1, tag=TAG_ACTIVATION)
    logits = [r.wait() for r in results]
    outbox.wait()
    return torch.cat(logits) if len(logits) > 1 else logits[0]


def _forward_rest(module, call: _ForwardCall, world, plan) -> None:
    """Ranks 1..P-1: receive micro-batch m (the receive of m + 1 already posted), run the
    stage, send the result on (or the logits back to rank 0 from the last rank)."""
    device, dtype = world.device, activation_dtype(plan)
    hidden_size = int(plan.config["hidden_size"])
    slices = micro_batch_slices(call.batch, call.micro_batches)
    shapes = [(sl.stop - sl.start, call.length, hidden_size) for sl in slices]
    prev = world.rank - 1
    dst, tag = (0, TAG_RESULT) if world.is_last else (world.rank + 1, TAG_ACTIVATION)
    outbox = Outbox()
    incoming = post_recv(shapes[0], dtype, device, src=prev, tag=TAG_ACTIVATION)
    for m, sl in enumerate(slices):
        current = incoming
        if m + 1 < len(slices):
            incoming = post_recv(shapes[m + 1], dtype, device, src=prev, tag=TAG_ACTIVATION)
        out = _run(module, current.wait(), call, sl, device)
        outbox.send(out.to(dtype), dst=dst, tag=tag)
    outbox.wait()
