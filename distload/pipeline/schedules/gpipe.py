"""The ``forward`` schedule: GPipe's forward-only pass of one batch. Rank 0 cuts the batch
into micro-batches and runs stage 0 on each while the next stages run the ones before:
one call takes (M + P - 1) stage-steps for M micro-batches over P stages instead of
M * P, a speed-up of at most P * M / (M + P - 1) (1.6 at P = 2, M = 4). It is the
streamed forward (`forward_stream.py`) with a stream of one batch.

Example (under ``torchrun --nproc_per_node=2``)::

    logits = pipe.forward(ids, mask, micro_batches=4)     # [B, T, vocab] on rank 0
"""

from __future__ import annotations

import torch

from .forward_stream import follow_forward, stream_batches
from .registry import Schedule, register_schedule

__all__ = ["pipeline_forward"]

NAME = "forward"


def pipeline_forward(pipe, input_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, *,
                     micro_batches: int | None = None) -> torch.Tensor | None:
    """Logits ``[B, T, vocab]`` (the activation dtype, on rank 0's device) of `input_ids`
    ``[B, T]`` on rank 0; None on the other ranks. Every rank calls it.

    `attention_mask` ``[B, T]`` is 1 for real tokens, 0 for (left) padding; positions
    count real tokens only, as in Hugging Face `generate`. `micro_batches` (default: the
    world size, at most B) is how many pieces the batch streams through the stages in.
    """
    batches = [(input_ids, attention_mask)] if pipe.world.is_first else None
    outputs = list(stream_batches(pipe, batches, micro_batches=micro_batches, name=NAME))
    return outputs[0] if pipe.world.is_first else None


def _serve(pipe) -> None:
    for _ in follow_forward(pipe):
        pass


register_schedule(Schedule(NAME, pipeline_forward, _serve))
