"""The small headers that announce each forward batch and each generation step down the
ranks, ahead of their data: plain data, encoded as fixed-length int64 tensors so a
receiver can post its receive before knowing anything.

Example::

    h = ForwardHeader(BATCH, batch=8, length=128, micro_batches=4)
    ForwardHeader.decode(h.encode()) == h
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ForwardHeader", "BATCH", "END", "ABORT", "StepHeader", "STEP", "PREFILL", "DROP", "STOP"]


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
