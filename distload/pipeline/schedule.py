"""What flows through the pipeline, and in which pieces: micro-batch splits, positions
from an attention mask, and the small headers that announce each forward batch and each
generation step.

Pure functions and plain data: no process group, no model. Every rank computes the same
split from the same (batch, micro-batches), which is how receivers know the shapes of the
activations they will get without being told.

Example::

    split_sizes(10, 4)                    # (3, 3, 2, 2)
    micro_batch_slices(10, 4)[1]          # slice(3, 6)
    position_ids_from_mask(torch.tensor([[0, 1, 1]]))   # tensor([[0, 0, 1]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "split_sizes", "micro_batch_slices", "position_ids_from_mask", "ForwardHeader",
    "BATCH", "END", "ABORT", "StepHeader", "STEP", "PREFILL", "DROP", "STOP", "prefill_parts",
]


def split_sizes(batch: int, parts: int) -> tuple[int, ...]:
    """`batch` rows in `min(parts, batch)` non-empty runs as equal as can be, the larger
    ones first (as `torch.tensor_split` does)."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if parts < 1:
        raise ValueError(f"micro_batches must be at least 1, got {parts}")
    parts = min(parts, batch)
    base, extra = divmod(batch, parts)
    return tuple(base + (i < extra) for i in range(parts))


def micro_batch_slices(batch: int, parts: int) -> list[slice]:
    """The row slices of `split_sizes(batch, parts)`, in order."""
    out, start = [], 0
    for size in split_sizes(batch, parts):
        out.append(slice(start, start + size))
        start += size
    return out


def prefill_parts(stages: int, groups: int, rows: int) -> int:
    """Into how many parts to split a group of `rows` sequences for its prefill: the
    prompts are a forward pass, and with one part per group the pipeline would fill and
    drain around just `groups` pieces; 4 pieces per stage keep it at least 80% busy
    (n / (n + stages - 1) for n pieces) while leaving each part big enough to compute
    well."""
    if stages <= 1:
        return 1
    return max(1, min(rows, -(-4 * stages // groups)))


def position_ids_from_mask(attention_mask: torch.Tensor, new_tokens: int | None = None
                           ) -> torch.Tensor:
    """RoPE positions as Hugging Face `generate` makes them: the running count of real
    tokens minus one (padding gets 0), so a left-padded row starts at position 0.

    `attention_mask` is ``[B, L]`` over cache + new tokens; returns the last
    `new_tokens` columns (all `L` when None).
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    return positions if new_tokens is None else positions[:, -new_tokens:]


# ----------------------------------------------------------------------------- headers

BATCH, END, ABORT = 11, 12, 13
"""Forward header kinds: a batch follows / the stream is over / rank 0 failed (its error
message follows)."""


@dataclass(frozen=True)
class ForwardHeader:
    """What announces each batch of a forward stream, rank r → r+1, ahead of its data.

    A BATCH header is followed by the ``[batch, length]`` attention mask when `masked`,
    then the micro-batches' activations; an ABORT header by `message_bytes` bytes of rank
    0's error (UTF-8). Encoded as 6 int64 values, so a receiver can post its receive
    before knowing anything.

    Example::

        h = ForwardHeader(BATCH, batch=8, length=128, micro_batches=4)
        ForwardHeader.decode(h.encode()) == h
    """

    kind: int
    batch: int = 0
    length: int = 0
    micro_batches: int = 0
    masked: bool = False
    message_bytes: int = 0

    LENGTH = 6

    def encode(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([self.kind, self.batch, self.length, self.micro_batches,
                             int(self.masked), self.message_bytes], dtype=torch.long,
                            device=device)

    @classmethod
    def decode(cls, encoded: torch.Tensor) -> "ForwardHeader":
        kind, batch, length, micro_batches, masked, message_bytes = encoded.tolist()
        if kind not in (BATCH, END, ABORT):
            raise ValueError(f"corrupt pipeline header: kind {kind}")
        return cls(kind, batch, length, micro_batches, bool(masked), message_bytes)


STEP, DROP, STOP, PREFILL = 1, 2, 3, 4
"""Generation header kinds: run one decode step of a group / forget a finished group / the
call is over / run the prompt of some of a group's rows."""


@dataclass(frozen=True)
class StepHeader:
    """What a generation message carries ahead of its activations, rank r → r+1.

    `keep` lists, in order, the rows of the group's current cache that take part in this
    step (rank 0 drops finished sequences), or for PREFILL the group's rows (counted from
    the group's first) whose prompt this part is; `tokens` is the number of new positions
    (the prompt length at prefill, 1 when decoding). Encoded as a fixed-length int64 tensor of
    ``4 + max_rows`` entries, so a receiver can post its receive before knowing anything.

    Example::

        h = StepHeader(STEP, group=1, keep=(0, 2), tokens=1)
        StepHeader.decode(h.encode(max_rows=4)) == h
    """

    kind: int
    group: int = -1
    keep: tuple[int, ...] = ()
    tokens: int = 0

    def encode(self, max_rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
        if len(self.keep) > max_rows:
            raise ValueError(f"{len(self.keep)} rows in a step; at most {max_rows}")
        out = torch.full((4 + max_rows,), -1, dtype=torch.long)
        out[:4] = torch.tensor([self.kind, self.group, len(self.keep), self.tokens])
        out[4:4 + len(self.keep)] = torch.tensor(self.keep, dtype=torch.long)
        return out.to(device)

    @classmethod
    def decode(cls, encoded: torch.Tensor) -> "StepHeader":
        values = encoded.tolist()
        kind, group, rows, tokens = values[:4]
        if kind not in (STEP, DROP, STOP, PREFILL):
            raise ValueError(f"corrupt pipeline header: kind {kind}")
        return cls(kind, group, tuple(values[4:4 + rows]), tokens)

    @staticmethod
    def length(max_rows: int) -> int:
        return 4 + max_rows
