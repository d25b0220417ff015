"""Inputs shared by the pipeline workers and their tests: a batch of prompts of different
lengths, left padded (row lengths `LENGTHS`), from a fixed seed; and `error_of`, which
records a call's error as the workers report it."""

import torch

LENGTHS = (10, 7, 3, 10, 1)


def batch(vocab_size: int, lengths=LENGTHS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] (padding holds token 0) and the 0/1 attention mask."""
    width = max(lengths)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def error_of(fn) -> str | None:
    """``"Type: message"`` of the error `fn()` raises, or None if it returns."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return f"{type(exc).__name__}: {exc}"
    return None
