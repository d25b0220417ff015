"""Choosing the next token from the last position's logits: greedy, or sampling with
temperature, top-k and top-p applied in Hugging Face's order and with its semantics.

Sampling is reproducible per sequence: sequence `i` of a call draws from its own
generator seeded by (`seed`, `i`), so its tokens do not depend on how the batch was
split into groups, on the number of ranks, or on the other sequences. Only the last
pipeline stage calls this.

Example::

    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_p=0.9, seed=0)
    sampler = Sampler(cfg, device=torch.device("cpu"))
    next_ids = sampler(logits_last_position, rows=[0, 1])   # [2] int64
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingConfig", "Sampler", "warp_logits"]

_GOLDEN = 0x9E3779B97F4A7C15  # spreads (seed, row) pairs over 63-bit seeds


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. With `do_sample=False` (greedy) the other fields
    are ignored. `top_k=None` and `top_p=None` disable those filters (unlike Hugging
    Face's `GenerationConfig`, whose `top_k` defaults to 50). `seed=None`: not
    reproducible (seeded from the global RNG)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p}")


def warp_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """float32 scores ``[n, vocab]`` after temperature, top-k then top-p (removed tokens
    get -inf), exactly as transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper`
    and `TopPLogitsWarper` (min_tokens_to_keep=1) compute them."""
    scores = logits.float()
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k is not None:
        k = min(cfg.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - cfg.top_p)
        remove_sorted[..., -1:] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


class Sampler:
    """Picks next tokens for rows of a call; holds one generator per sequence.

    Called on the last stage once per step of a group: `rows` are the call's batch
    indices of the logits' rows, in order.
    """

    def __init__(self, cfg: SamplingConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self._generators: dict[int, torch.Generator] = {}
        self._base_seed = cfg.seed if cfg.seed is not None else \
            int(torch.randint(0, 2**62, (1,)).item())

    def _generator(self, row: int) -> torch.Generator:
        gen = self._generators.get(row)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((self._base_seed * _GOLDEN + row) % (2**63))
            self._generators[row] = gen
        return gen

    def __call__(self, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """`logits` ``[n, vocab]`` → next token ids ``[n]`` (int64)."""
        if not self.cfg.do_sample:
            return torch.argmax(logits.float(), dim=-1)
        probs = warp_logits(logits, self.cfg).softmax(dim=-1)
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for i, row in enumerate(rows):
            out[i] = torch.multinomial(probs[i], 1, generator=self._generator(row))[0]
        return out
