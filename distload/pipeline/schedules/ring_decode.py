"""The ``generate`` schedule: pipelined generation with a KV cache per stage and several
sequence groups in flight.

The batch is split into groups (default: one per rank), G of them in flight at once (G =
`micro_batches`, default the world size); with more groups than that (`group_size`), a
group whose sequences have all stopped makes room for the next, so KV-cache memory is
bounded by G groups and sequences that stop early at EOS leave no idle stage behind.
The groups in flight go round a ring:
rank 0 embeds a group's new tokens and runs its layers, each next rank runs its own, the
last rank samples each sequence's next token and sends the tokens back to rank 0, which
feeds them in as the group's next step. While group g is on rank 1, group g + 1 is on
rank 0, so decoding keeps every rank busy. The prompts (the prefill) are a forward pass
and go through in smaller parts (`microbatch.prefill_parts`), so that the pipeline is full
then too; a group's parts are stacked into one before its first decode step. Each rank
keeps one `KVCache` (and attention mask) per group, for its own layers only.

Rank 0 owns the sequences: it writes the tokens, sees which sequences hit EOS or their
budget, and tells the ranks downstream, in each step's header, which rows of the group go
on (the others are dropped from every cache); a group with none left is forgotten
everywhere. The other ranks only follow headers: they never need to know why.

Who calls what: every rank calls `pipeline_generate` (through `Pipeline.generate`), or
the ranks after the first run `follow_generate` from `Pipeline.serve`; only rank 0's
arguments are used (rank 0 broadcasts the call's setup; EOS and padding never leave
rank 0), and only rank 0 gets the tokens. Failures stop every rank as in
`pipeline_forward`.

Example (under ``torchrun --nproc_per_node=2``)::

    pipe = distload.load("demo")
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]]); mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = pipe.generate(ids, mask, max_new_tokens=16)   # [2, 3 + 16] on rank 0, else None
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from ... import trace
from ...log import logger
from ..comm import Inbound, Outbox, broadcast_call, post_recv
from ..inputs import check_positions, resolve_eos, validate_inputs
from ..messages import DROP, PREFILL, STEP, STOP, StepHeader
from ..microbatch import micro_batch_slices, position_ids_from_mask, prefill_parts, split_sizes
from ..sampling import Sampler, SamplingConfig
from .registry import Schedule, register_schedule

__all__ = ["pipeline_generate", "follow_generate"]

NAME = "generate"


@dataclass(frozen=True)
class _GenerateCall:
    """What rank 0 tells every rank once per call."""

    batch: int
    prompt_length: int
    groups: int                 # how many the batch is split into
    in_flight: int              # how many of them run at once
    mask: torch.Tensor          # [B, T] int64 on the CPU
    max_new_tokens: int
    sampling: SamplingConfig

    @property
    def max_rows(self) -> int:
        return max(split_sizes(self.batch, self.groups))


def pipeline_generate(pipe, input_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 32,
                      micro_batches: int | None = None, group_size: int | None = None,
                      do_sample: bool = False,
                      temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, eos_token_id: int | list[int] | None = None,
                      pad_token_id: int | None = None, seed: int | None = None
                      ) -> torch.Tensor | None:
    """Prompt plus generated ids ``[B, T + n]`` on rank 0 (None elsewhere), where n ≤
    `max_new_tokens` is the most any sequence generated. Every rank calls it.

    `attention_mask` marks (left) padding. `micro_batches` (default: the world size, at
    most B) is the number of sequence groups in flight. `group_size` (default: B over
    `micro_batches`) is the most sequences a group holds; with smaller groups, a group
    that is done makes room for the next. A sequence that emits an EOS id
    stops; its later positions hold `pad_token_id`; the call ends when all have stopped.
    Greedy by default; `do_sample=True` samples with `temperature`, `top_k`, `top_p`,
    reproducibly per sequence for a given `seed`.
    """
    world, config = pipe.world, pipe.plan.config
    rank0: dict = {"start": time.perf_counter()}  # rank 0's own state: validated ids, EOS and pad
    pipe.start_call(NAME)
    if not world.is_first:
        return follow_generate(pipe)

    def make_call() -> _GenerateCall:
        ids, mask = validate_inputs(input_ids, attention_mask, pipe.vocab_size)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
        check_positions(ids.shape[1] + max_new_tokens, pipe.max_positions,
                        "the prompts' length and max_new_tokens need")
        if mask is None:
            mask = torch.ones_like(ids)
        elif not bool(mask[:, -1].all()):
            logger.warning("attention_mask has padding on the right; generation appends after "
                           "the last position, so pad prompts on the left")
        sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k,
                                  top_p=top_p, seed=seed)
        rank0["ids"] = ids
        rank0["eos"], rank0["pad"] = resolve_eos(eos_token_id, pad_token_id, config)
        batch, slots = ids.shape[0], micro_batches or world.world_size
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        groups = len(split_sizes(batch, slots if group_size is None else -(-batch // group_size)))
        return _GenerateCall(batch, ids.shape[1], groups, min(slots, groups), mask,
                             max_new_tokens, sampling)

    call = broadcast_call(world, make_call)
    if call.max_new_tokens == 0:
        return rank0["ids"].clone().to(input_ids.device)
    logger.debug("generate: %d sequences in %d groups (%d in flight), %d new tokens", call.batch,
                 call.groups, call.in_flight, call.max_new_tokens)
    runner = _StageRunner(pipe.module, call, world.device)
    driver = _Driver(runner, call, world, pipe.activation_dtype, rank0)
    with torch.no_grad():
        out = driver.run()
    pipe.last_call = driver.figures
    return out.to(input_ids.device)


def follow_generate(pipe) -> None:
    """Ranks other than 0, once rank 0 has announced a generate call: take part in it."""
    call = broadcast_call(pipe.world, None)
    if call.max_new_tokens > 0:
        runner = _StageRunner(pipe.module, call, pipe.world.device)
        with torch.no_grad():
            _follow(runner, call, pipe.world, pipe.activation_dtype, pipe.hidden_size)


# ----------------------------------------------------------------------------- every rank

class _GroupState:
    """One group on one stage: which of the call's sequences it holds (in row order), their
    attention mask over cache + new tokens, and the stage's cache of their keys/values.
    The prompt comes in parts (each with a cache of its own); they are stacked into one
    state before the group's first decode step."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor, KVCache]] = []
        self.rows = self.mask = self.cache = None

    def stack_parts(self) -> None:
        if self.parts:
            rows, masks, caches = zip(*self.parts)
            self.rows, self.mask = torch.cat(rows), torch.cat(masks)
            self.cache, self.parts = type(caches[0]).stacked(caches), []


class _StageRunner:
    """This rank's stage applied to one part of a group's prompt, or one decode step of a
    group. Used on every rank; both return the stage's output and the call's rows it is
    for. The output is hidden states, or on the last stage the logits of the last
    position only ``[n, vocab]`` (the head runs on nothing else)."""

    def __init__(self, module, call: _GenerateCall, device: torch.device) -> None:
        self.module, self.call, self.device = module, call, device
        self.slices = micro_batch_slices(call.batch, call.groups)
        self.groups: dict[int, _GroupState] = {}

    def run(self, kind: int, group: int, keep: tuple[int, ...], x: torch.Tensor
            ) -> tuple[torch.Tensor, list[int]]:
        """`prefill` for a PREFILL header, `step` for a STEP header."""
        return (self.prefill if kind == PREFILL else self.step)(group, keep, x)

    def prefill(self, group: int, part: tuple[int, ...], x: torch.Tensor
                ) -> tuple[torch.Tensor, list[int]]:
        """Run the prompt `x` (ids ``[n, T]`` on rank 0, hidden states ``[n, T, H]``
        elsewhere) of the group's rows `part` (counted from the group's first row)."""
        rows = torch.arange(self.slices[group].start, self.slices[group].stop)[list(part)]
        mask = self.call.mask[rows].to(self.device)
        cache = self.module.new_cache()
        with trace.span("prefill", "pipeline", group=group, rows=len(part), tokens=x.shape[1]):
            out = self._run(x, mask, None if bool(mask.all()) else mask, cache)  # None: causal
        self.groups.setdefault(group, _GroupState()).parts.append((rows, mask, cache))
        return out, rows.tolist()

    def step(self, group: int, keep: tuple[int, ...], x: torch.Tensor
             ) -> tuple[torch.Tensor, list[int]]:
        """Run the new tokens `x` (``[n, 1]`` ids or hidden states) of the rows `keep` of
        `group`'s current rows; the others have stopped and are dropped here for good."""
        state = self.groups[group]
        state.stack_parts()
        if len(keep) != len(state.rows):  # some sequences stopped: drop them everywhere
            idx = torch.tensor(keep, dtype=torch.long)
            state.rows = state.rows[idx]
            state.mask = state.mask[idx.to(self.device)]
            state.cache.select(idx.to(self.device))
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(keep), x.shape[1])], dim=1)
        with trace.span("decode step", "pipeline", group=group, rows=len(keep)):
            out = self._run(x, state.mask, state.mask, state.cache)
        return out, state.rows.tolist()

    def _run(self, x: torch.Tensor, mask: torch.Tensor, attention: torch.Tensor | None,
             cache: KVCache) -> torch.Tensor:
        if x.shape[0] != mask.shape[0]:
            raise RuntimeError(f"got {x.shape[0]} rows for {mask.shape[0]} sequences")
        positions = position_ids_from_mask(mask, x.shape[1])
        return self.module(x, position_ids=positions, attention_mask=attention, cache=cache,
                           last_only=True)

    def drop(self, group: int) -> None:
        self.groups.pop(group, None)


# ----------------------------------------------------------------------------- rank 0

class _Driver:
    """Rank 0: launches each group's steps, collects the tokens the last rank sends back
    (in launch order), records them, and decides which sequences go on."""

    def __init__(self, runner: _StageRunner, call: _GenerateCall, world, dtype: torch.dtype,
                 rank0: dict) -> None:
        self.runner, self.call, self.world = runner, call, world
        self.ids, self.pad = rank0["ids"], rank0["pad"]
        self.eos = torch.tensor(rank0["eos"], dtype=torch.long)
        self.dtype = dtype
        self.outbox = Outbox()
        self.sampler = Sampler(call.sampling, world.device) if not world.distributed else None
        self.inflight: deque[tuple[int, torch.Tensor, Inbound]] = deque()
        self.parts_left: dict[int, int] = {}  # group -> prompt parts still to come back
        self.first_tokens: dict[int, list] = {}  # group -> (rows, tokens) of its parts so far
        self.start = rank0.get("start", time.perf_counter())
        self.figures: dict = {}  # see `run`

    def run(self) -> torch.Tensor:
        """The call's output ids; `figures` gets its timings: seconds from the call's start
        to the first token of any sequence (``time_to_first_token_seconds``) and to every
        sequence's first token (``prefill_seconds``, for ``prompt_tokens``), then to the
        end (``decode_seconds``, for the ``decode_tokens`` after each first)."""
        call, t0 = self.call, self.call.prompt_length
        first = every_first = None
        out = torch.full((call.batch, t0 + call.max_new_tokens), self.pad, dtype=torch.long)
        out[:, :t0] = self.ids
        produced = torch.zeros(call.batch, dtype=torch.long)
        finished = torch.zeros(call.batch, dtype=torch.bool)
        waiting = deque(range(call.groups))  # groups not started yet
        for _ in range(call.in_flight):
            self._start(waiting.popleft())
        while self.inflight:
            group, rows, pending = self.inflight.popleft()
            tokens = pending.wait().to("cpu")
            if self.parts_left.get(group):  # a part of the group's prompt: wait for all
                self.first_tokens[group].append((rows, tokens))
                self.parts_left[group] -= 1
                if self.parts_left[group]:
                    continue
                rows, tokens = (torch.cat(t) for t in zip(*self.first_tokens.pop(group)))
            out[rows, t0 + produced[rows]] = tokens
            produced[rows] += 1
            if every_first is None:
                now = time.perf_counter()
                if first is None:
                    first = now
                    trace.instant("first token", "pipeline")
                if bool((produced > 0).all()):
                    every_first = now
            if self.eos.numel():
                finished[rows] |= torch.isin(tokens, self.eos)
            alive = (~finished[rows]) & (produced[rows] < call.max_new_tokens)
            keep = alive.nonzero().flatten()
            if keep.numel() == 0:
                self.runner.drop(group)
                self._send_header(StepHeader(DROP, group))
                if waiting:  # its room goes to the next group
                    self._start(waiting.popleft())
                continue
            self._launch(STEP, group, tuple(keep.tolist()), rows[keep], tokens[keep][:, None])
        self._send_header(StepHeader(STOP))
        self.outbox.wait()
        end = time.perf_counter()
        first, every_first = first or end, every_first or end
        self.figures = {"time_to_first_token_seconds": round(first - self.start, 6),
                        "prompt_tokens": int(call.mask.sum()),
                        "prefill_seconds": round(every_first - self.start, 6),
                        "decode_tokens": int(produced.sum()) - call.batch,
                        "decode_seconds": round(end - every_first, 6)}
        return out[:, :t0 + int(produced.max())]

    def _start(self, group: int) -> None:
        """Launch `group`'s prompts, in parts (`prefill_parts`)."""
        sl = self.runner.slices[group]
        rows = torch.arange(sl.start, sl.stop)
        count = prefill_parts(self.world.world_size, self.call.in_flight, len(rows))
        self.parts_left[group], self.first_tokens[group] = count, []
        for part in micro_batch_slices(len(rows), count):
            self._launch(PREFILL, group, tuple(range(part.start, part.stop)), rows[part],
                         self.ids[sl][part])

    def _launch(self, kind: int, group: int, keep: tuple[int, ...], rows: torch.Tensor,
                ids: torch.Tensor) -> None:
        """Run rank 0's stage on this prompt part or step of `group` and send it on; post
        the receive of the tokens it will come back as."""
        out, _ = self.runner.run(kind, group, keep, ids.to(self.world.device))
        if self.sampler is not None:  # a world of one: rank 0 is also the last stage
            tokens = self.sampler(out, rows.tolist())
            self.inflight.append((group, rows, Inbound(tokens, None)))
            return
        self._send_header(StepHeader(kind, group, keep, ids.shape[1]))
        self.outbox.send(out.to(self.dtype), dst=1)
        pending = post_recv((len(keep),), torch.long, self.world.device,
                            src=self.world.world_size - 1, group=self.world.return_group)
        self.inflight.append((group, rows, pending))

    def _send_header(self, header: StepHeader) -> None:
        if self.world.distributed:
            encoded = header.encode(self.call.max_rows, self.world.device)
            self.outbox.send(encoded, dst=1)


# ----------------------------------------------------------------------------- ranks 1..P-1

def _follow(runner: _StageRunner, call: _GenerateCall, world, dtype: torch.dtype,
            hidden_size: int) -> None:
    """Ranks after the first: run every step the headers announce, in arrival order, and
    pass it on (the last rank samples and sends the tokens to rank 0) until STOP."""
    device, prev = world.device, world.rank - 1
    header_len = StepHeader.length(call.max_rows)
    sampler = Sampler(call.sampling, device) if world.is_last else None
    outbox = Outbox()
    # Receives are posted in the order rank `prev` sends (header, activations), and this
    # step's sends are posted before the next header's receive. On NCCL one rank's sends
    # and receives of a group run on one stream in post order: a next-header receive posted
    # ahead would hold this step's sends back until rank 0 sends that header, which it does
    # only once this step's tokens are back — a deadlock whenever one group is in flight.
    while True:
        raw = post_recv((header_len,), torch.long, device, src=prev).wait()
        header = StepHeader.decode(raw)
        if not world.is_last:  # downstream learns the step (and its shapes) at once
            outbox.send(raw, dst=world.rank + 1)
        if header.kind == STOP:
            break
        if header.kind == DROP:
            runner.drop(header.group)
            continue
        act = post_recv((len(header.keep), header.tokens, hidden_size), dtype, device, src=prev)
        out, rows = runner.run(header.kind, header.group, header.keep, act.wait())
        if sampler is not None:
            outbox.send(sampler(out, rows), dst=0, group=world.return_group)
        else:
            outbox.send(out.to(dtype), dst=world.rank + 1)
    outbox.wait()


register_schedule(Schedule(NAME, pipeline_generate, follow_generate))
