"""The ``continuous`` schedule: decoding where sequences join and leave the running groups
at every step (continuous batching), for a server whose requests come and go.

Rank 0 drives it through a `ContinuousDecoder` (its scheduler, in `distload.serve`,
decides what runs); the other ranks follow the messages it sends down the ring, as in
``generate`` (`ring_decode.py`): each message is a fixed-length header, then the
activations. What differs is that every sequence has an id of its own:

* PREFILL (group, id, T, sampling): run one sequence's prompt alone (batch 1, no
  padding) and keep its cache aside; the last rank samples its first token.
* STEP (group, ids): one decode step of the group, whose rows are now exactly `ids`, in
  that order: rows not listed are dropped from the cache at once (finished or
  cancelled), prefilled ids not yet in the group join it (their caches are left-padded to
  the group's length and stacked in, the padding masked). Rank 0 lists the survivors in
  their order, then the joiners.
* FORGET (ids): drop prefilled caches that will never join (a sequence done after its
  first token, or cancelled).
* DROP (group): the group is empty; forget its cache.
* STOP: the call is over (rank 0 ends it when nothing runs, so that the other ranks go
  back to waiting for calls without a time limit: `calls`).

Each sequence is sampled with its own `SamplingConfig` on the last rank (sent with its
PREFILL), from its own generator, so its tokens never depend on what it shared a step
with. A greedy sequence's tokens are those of the model run on it alone, up to the
floating-point effect of batching (padded rows are masked out).

Who calls what: rank 0 makes a `ContinuousDecoder` and `open`s a call when work arrives,
`close`s it when none is left; the other ranks run `follow_continuous` from
`Pipeline.serve`.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

import torch

from ... import trace
from ..comm import Inbound, Outbox, broadcast_call, post_recv
from ..microbatch import position_ids_from_mask
from ..sampling import SamplingConfig, warp_logits
from .registry import Schedule, register_schedule

__all__ = ["ContinuousDecoder", "follow_continuous", "NAME"]

NAME = "continuous"

PREFILL, STEP, FORGET, DROP, STOP = 21, 22, 23, 24, 25
_KINDS = (PREFILL, STEP, FORGET, DROP, STOP)
_SAMPLING_FIELDS = 5  # do_sample, temperature, top_k, top_p, seed


def _f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", x))[0]


@dataclass(frozen=True)
class _Message:
    """One message's header: ``[kind, group, tokens, n, ids (max_rows), sampling (5)]``
    as int64, so a receiver posts its receive before knowing anything."""

    kind: int
    group: int = -1
    ids: tuple[int, ...] = ()
    tokens: int = 0
    sampling: SamplingConfig | None = None

    def encode(self, max_rows: int, device: torch.device) -> torch.Tensor:
        if len(self.ids) > max_rows:
            raise ValueError(f"{len(self.ids)} sequences in a message; at most {max_rows}")
        out = [self.kind, self.group, self.tokens, len(self.ids), *self.ids]
        out += [-1] * (max_rows - len(self.ids))
        s = self.sampling or SamplingConfig()
        out += [int(s.do_sample), _f2i(s.temperature), -1 if s.top_k is None else s.top_k,
                _f2i(-1.0 if s.top_p is None else s.top_p), -1 if s.seed is None else s.seed]
        return torch.tensor(out, dtype=torch.long, device=device)

    @classmethod
    def decode(cls, encoded: torch.Tensor, max_rows: int) -> "_Message":
        v = encoded.tolist()
        kind, group, tokens, n = v[:4]
        if kind not in _KINDS:
            raise ValueError(f"corrupt pipeline header: kind {kind}")
        do_sample, temp, top_k, top_p, seed = v[4 + max_rows:]
        sampling = SamplingConfig(do_sample=bool(do_sample), temperature=_i2f(temp),
                                  top_k=None if top_k < 0 else top_k,
                                  top_p=None if _i2f(top_p) < 0 else _i2f(top_p),
                                  seed=None if seed < 0 else seed)
        return cls(kind, group, tuple(v[4:4 + n]), tokens, sampling if kind == PREFILL else None)

    @staticmethod
    def length(max_rows: int) -> int:
        return 4 + max_rows + _SAMPLING_FIELDS


@dataclass(frozen=True)
class _Call:
    """What rank 0 tells every rank once per call."""

    max_rows: int  # the most sequences a group holds


# ----------------------------------------------------------------------------- every rank

class _Group:
    """One group on one stage: its sequences' ids in row order, their mask over the cached
    positions, and the stage's cache."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.mask: torch.Tensor | None = None
        self.cache = None


class _Stage:
    """This rank's stage on the call's messages: prefilled caches waiting to join, and
    the groups."""

    def __init__(self, module, device: torch.device) -> None:
        self.module, self.device = module, device
        self.pending: dict[int, tuple[torch.Tensor, object]] = {}  # id -> (mask, cache)
        self.groups: dict[int, _Group] = {}

    def prefill(self, seq: int, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(1, x.shape[1], dtype=torch.long, device=self.device)
        cache = self.module.new_cache()
        with trace.span("prefill", "pipeline", sequence=seq, tokens=x.shape[1]):
            out = self._run(x, mask, None, cache)  # None: causal, nothing padded
        self.pending[seq] = (mask, cache)
        return out

    def step(self, group: int, ids: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        state = self.groups.setdefault(group, _Group())
        self._regroup(state, list(ids))
        state.mask = torch.cat([state.mask, state.mask.new_ones(len(ids), 1)], dim=1)
        with trace.span("decode step", "pipeline", group=group, rows=len(ids)):
            return self._run(x, state.mask, state.mask, state.cache)

    def _regroup(self, state: _Group, ids: list[int]) -> None:
        """Make the group's rows exactly `ids`: drop the rows not listed, left-pad and
        stack in the joiners, then cut the leading positions no row attends to."""
        kept = [i for i in state.ids if i in set(ids)]
        joiners = [i for i in ids if i not in set(state.ids)]
        parts = []
        if kept:
            if len(kept) != len(state.ids):
                idx = torch.tensor([state.ids.index(i) for i in kept], device=self.device)
                state.cache.select(idx)
                state.mask = state.mask.index_select(0, idx)
            parts.append((state.mask, state.cache))
        for i in joiners:
            if i not in self.pending:
                raise RuntimeError(f"sequence {i} joins group before its prefill")
            parts.append(self.pending.pop(i))
        length = max(m.shape[1] for m, _ in parts)
        masks, caches = [], []
        for mask, cache in parts:
            cache.pad_left(length - mask.shape[1])
            masks.append(torch.cat([mask.new_zeros(mask.shape[0], length - mask.shape[1]), mask], 1))
            caches.append(cache)
        state.mask = torch.cat(masks)
        state.cache = caches[0] if len(caches) == 1 else type(caches[0]).stacked(caches)
        order = kept + joiners
        if order != ids:
            idx = torch.tensor([order.index(i) for i in ids], device=self.device)
            state.cache.select(idx)
            state.mask = state.mask.index_select(0, idx)
        state.ids = ids
        first = int(state.mask.any(dim=0).long().argmax())
        if first:
            state.cache.drop_left(first)
            state.mask = state.mask[:, first:]

    def forget(self, ids: tuple[int, ...]) -> None:
        for i in ids:
            self.pending.pop(i, None)

    def drop(self, group: int) -> None:
        self.groups.pop(group, None)

    def _run(self, x, mask, attention, cache) -> torch.Tensor:
        positions = position_ids_from_mask(mask, x.shape[1])
        return self.module(x, position_ids=positions, attention_mask=attention, cache=cache,
                           last_only=True)


class _Sampler:
    """The last rank: each sequence's next token, with its own config and generator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.configs: dict[int, tuple[SamplingConfig, torch.Generator | None]] = {}

    def add(self, seq: int, cfg: SamplingConfig) -> None:
        gen = None
        if cfg.do_sample:
            gen = torch.Generator(device=self.device)
            if cfg.seed is None:
                gen.seed()
            else:
                gen.manual_seed(cfg.seed)
        self.configs[seq] = (cfg, gen)

    def forget(self, ids) -> None:
        for i in ids:
            self.configs.pop(i, None)

    def __call__(self, logits: torch.Tensor, ids) -> torch.Tensor:
        out = torch.argmax(logits.float(), dim=-1)
        for row, seq in enumerate(ids):
            cfg, gen = self.configs[seq]
            if cfg.do_sample:
                probs = warp_logits(logits[row:row + 1], cfg).softmax(dim=-1)
                out[row] = torch.multinomial(probs[0], 1, generator=gen)[0]
        return out


# ----------------------------------------------------------------------------- rank 0

class ContinuousDecoder:
    """Rank 0's side of the schedule: launch prefills and steps, get their tokens back in
    launch order. Holds no policy: which sequence runs in which group is its caller's.

    Example (rank 0; the other ranks run ``pipe.serve()``)::

        dec = ContinuousDecoder(pipe, max_rows=4)
        dec.open()
        dec.prefill(group=0, seq=7, ids=[1, 2, 3], sampling=SamplingConfig())
        kind, group, ids, tokens = dec.next_result()   # PREFILL, 0, (7,), tensor([42])
        dec.step(0, [7], [42]); ...; dec.drop(0); dec.close()
    """

    def __init__(self, pipe, *, max_rows: int) -> None:
        self.pipe, self.world, self.max_rows = pipe, pipe.world, max_rows
        self.stage = _Stage(pipe.module, self.world.device)
        self.local = None if self.world.distributed else _Sampler(self.world.device)
        self.outbox: Outbox | None = None
        self.inflight: deque[tuple[int, int, tuple[int, ...], Inbound]] = deque()
        self.calls = 0

    @property
    def is_open(self) -> bool:
        return self.outbox is not None

    def open(self) -> None:
        """Start a call (every other rank joins it from `serve()`)."""
        self.pipe.start_call(NAME)
        broadcast_call(self.world, lambda: _Call(self.max_rows))
        self.outbox, self.calls = Outbox(), self.calls + 1

    def close(self) -> None:
        """End the call; every group and prefilled cache must have been dropped."""
        if self.outbox is None:
            return
        if self.inflight or self.stage.pending or self.stage.groups:  # a leak of KV cache
            raise RuntimeError(f"close() with {len(self.inflight)} results to collect, "
                               f"{len(self.stage.pending)} prefilled sequences and "
                               f"{len(self.stage.groups)} groups still held")
        self._send(_Message(STOP))
        self.outbox.wait()
        self.outbox = None
        self.stage = _Stage(self.pipe.module, self.world.device)

    def prefill(self, group: int, seq: int, ids: list[int], sampling: SamplingConfig) -> None:
        x = torch.tensor([ids], dtype=torch.long, device=self.world.device)
        if self.local is not None:
            self.local.add(seq, sampling)
        with torch.no_grad():
            out = self.stage.prefill(seq, x)
        self._launch(_Message(PREFILL, group, (seq,), len(ids), sampling), out)

    def step(self, group: int, ids: list[int], tokens: list[int]) -> None:
        x = torch.tensor(tokens, dtype=torch.long, device=self.world.device)[:, None]
        if self.local is not None and group in self.stage.groups:  # rows gone from the group
            self.local.forget(set(self.stage.groups[group].ids) - set(ids))
        with torch.no_grad():
            out = self.stage.step(group, tuple(ids), x)
        self._launch(_Message(STEP, group, tuple(ids), 1), out)

    def forget(self, ids: list[int]) -> None:
        """Prefilled sequences that will not join their group."""
        for first in range(0, len(ids), self.max_rows):
            part = tuple(ids[first:first + self.max_rows])
            self.stage.forget(part)
            if self.local is not None:
                self.local.forget(part)
            self._send(_Message(FORGET, ids=part))

    def drop(self, group: int) -> None:
        """The group has no sequence left: every rank frees its cache."""
        state = self.stage.groups.get(group)
        if self.local is not None and state is not None:
            self.local.forget(state.ids)
        self.stage.drop(group)
        self._send(_Message(DROP, group))

    def next_result(self) -> tuple[int, int, tuple[int, ...], torch.Tensor]:
        """The oldest launched message's tokens: ``(kind, group, ids, tokens [n] on the
        CPU)``."""
        kind, group, ids, pending = self.inflight.popleft()
        return kind, group, ids, pending.wait().to("cpu")

    @property
    def waiting(self) -> int:
        return len(self.inflight)

    def _launch(self, msg: _Message, out: torch.Tensor) -> None:
        if self.local is not None:  # a world of one: rank 0 is also the last stage
            self.inflight.append((msg.kind, msg.group, msg.ids, Inbound(self.local(out, msg.ids), None)))
            return
        self._send(msg)
        self.outbox.send(out.to(self.pipe.activation_dtype), dst=1)
        pending = post_recv((len(msg.ids),), torch.long, self.world.device,
                            src=self.world.world_size - 1, group=self.world.return_group)
        self.inflight.append((msg.kind, msg.group, msg.ids, pending))

    def _send(self, msg: _Message) -> None:
        if self.world.distributed:
            self.outbox.send(msg.encode(self.max_rows, self.world.device), dst=1)


# ----------------------------------------------------------------------------- ranks 1..P-1

def follow_continuous(pipe) -> None:
    """Ranks other than 0, once rank 0 has announced a continuous call: run every message
    in arrival order and pass it on (the last rank samples and sends the tokens back)
    until STOP. Every receive is posted after the sends of the message before it (see
    the note in the loop)."""
    world, device = pipe.world, pipe.world.device
    call = broadcast_call(world, None)
    header_len, prev = _Message.length(call.max_rows), world.rank - 1
    stage = _Stage(pipe.module, device)
    sampler = _Sampler(device) if world.is_last else None
    outbox = Outbox()
    incoming = post_recv((header_len,), torch.long, device, src=prev)
    with torch.no_grad():
        while True:
            raw = incoming.wait()
            msg = _Message.decode(raw, call.max_rows)
            if msg.kind in (STOP, FORGET, DROP):
                if not world.is_last:
                    outbox.send(raw, dst=world.rank + 1)
                if msg.kind == STOP:
                    break
                if msg.kind == FORGET:
                    stage.forget(msg.ids)
                    if sampler is not None:
                        sampler.forget(msg.ids)
                else:
                    state = stage.groups.get(msg.group)
                    if sampler is not None and state is not None:
                        sampler.forget(state.ids)
                    stage.drop(msg.group)
                incoming = post_recv((header_len,), torch.long, device, src=prev)
                continue
            act = post_recv((len(msg.ids), msg.tokens, pipe.hidden_size), pipe.activation_dtype,
                            device, src=prev)
            if msg.kind == PREFILL:
                out = stage.prefill(msg.ids[0], act.wait())
                if sampler is not None:
                    sampler.add(msg.ids[0], msg.sampling)
            else:
                before = set(stage.groups[msg.group].ids) if msg.group in stage.groups else set()
                out = stage.step(msg.group, msg.ids, act.wait())
                if sampler is not None:
                    sampler.forget(before - set(msg.ids))
            if sampler is not None:
                outbox.send(sampler(out, msg.ids), dst=0, group=world.return_group)
            else:
                outbox.send(raw, dst=world.rank + 1)
                outbox.send(out.to(pipe.activation_dtype), dst=world.rank + 1)
            # the next header's receive only now, after this message's sends: eager NCCL runs
            # a group's sends and receives in post order, and rank 0 sends that header only
            # once these tokens are back (with one group in flight) — posted earlier, the
            # sends would wait behind it for ever
            incoming = post_recv((header_len,), torch.long, device, src=prev)
    outbox.wait()


register_schedule(Schedule(NAME, lambda pipe, *a, **k: _run_unsupported(), follow_continuous))


def _run_unsupported():
    raise RuntimeError("the continuous schedule is driven by rank 0's ContinuousDecoder "
                       "(distload.serve); the other ranks follow it from pipe.serve()")
