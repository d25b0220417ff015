"""How batches are cut into micro-batches, and the positions of left-padded rows.

Pure functions: no process group, no model. Every rank computes the same split from the
same (batch, micro-batches), which is how receivers know the shapes of the activations
they will get without being told.

Example::

    split_sizes(10, 4)                    # (3, 3, 2, 2)
    micro_batch_slices(10, 4)[1]          # slice(3, 6)
    position_ids_from_mask(torch.tensor([[0, 1, 1]]))   # tensor([[0, 0, 1]])
"""

from __future__ import annotations

import torch

from ..models.common.attention import position_ids_from_mask  # the models derive positions the same way

__all__ = ["split_sizes", "micro_batch_slices", "prefill_parts", "position_ids_from_mask"]


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
