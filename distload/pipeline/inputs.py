"""Rank 0's inputs to a pipelined call, checked before anything is sent: token ids and
attention masks, and the EOS and pad ids of a generation (as Hugging Face picks them).

Example::

    ids, mask = validate_inputs(torch.tensor([[1, 2, 3]]), None, vocab_size=32000)
    eos, pad = resolve_eos(None, None, plan.config)
"""

from __future__ import annotations

import torch

__all__ = ["validate_inputs", "check_positions", "resolve_eos"]


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


def check_positions(positions: int, limit: int | None, what: str) -> None:
    """ValueError when a call needs more `positions` than a model with learned absolute
    position embeddings has (`limit`, its `max_positions`; None: RoPE and the like, no
    table to run off)."""
    if limit is not None and positions > limit:
        raise ValueError(f"{what} {positions} positions; this model has {limit} (its learned "
                         f"position table, config.json's n_positions)")


def resolve_eos(eos_token_id, pad_token_id, config: dict) -> tuple[tuple[int, ...], int]:
    """The EOS ids (None: the model config's; an empty list: none) and the pad id (None:
    the config's, else the first EOS id, else 0), as Hugging Face `generate` picks them."""
    if eos_token_id is None:
        eos_token_id = config.get("eos_token_id")
    if eos_token_id is None:
        eos: tuple[int, ...] = ()
    elif isinstance(eos_token_id, (list, tuple)):
        eos = tuple(int(e) for e in eos_token_id)
    else:
        eos = (int(eos_token_id),)
    if pad_token_id is None:
        pad_token_id = config.get("pad_token_id")
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, int(pad_token_id)
