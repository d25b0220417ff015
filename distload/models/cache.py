"""The key/value cache of one pipeline stage for one group of sequences."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["KVCache"]


class KVCache:
    """Keys and values, after RoPE, of the layers of one stage, keyed by the layer's key in
    `model.layers` ("0".."N-1"); tensors are ``[batch, kv_heads, seq, head_dim]``.

    Growing by concatenation is O(seq) per step, which is fine next to a pipeline's
    communication and keeps the cache exactly as long as what was fed (no capacity to
    choose up front).

    Example::

        cache = KVCache()
        logits = model(prompt_ids, position_ids=pos, cache=cache)   # prefill
        logits = model(next_ids, position_ids=pos[:, -1:] + 1, cache=cache)
        cache.length  # prompt length + 1
    """

    def __init__(self) -> None:
        self._keys: dict[str, torch.Tensor] = {}
        self._values: dict[str, torch.Tensor] = {}

    def update(self, layer_key: str, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' `k`, `v` of layer `layer_key`; return all its keys and
        values so far (the past followed by the new tokens)."""
        if layer_key in self._keys:
            k = torch.cat([self._keys[layer_key], k], dim=2)
            v = torch.cat([self._values[layer_key], v], dim=2)
        self._keys[layer_key], self._values[layer_key] = k, v
        return k, v

    def seq_length(self, layer_key: str) -> int:
        """Tokens cached for layer `layer_key` (0 before its first update)."""
        k = self._keys.get(layer_key)
        return 0 if k is None else k.shape[2]

    @property
    def length(self) -> int:
        """Tokens cached (the longest layer's count; all layers agree between forwards)."""
        return max((k.shape[2] for k in self._keys.values()), default=0)

    @property
    def batch_size(self) -> int | None:
        return next((k.shape[0] for k in self._keys.values()), None)

    def select(self, batch_indices: Sequence[int] | torch.Tensor) -> None:
        """Keep only the sequences `batch_indices` (in that order), e.g. to drop finished
        ones or to reorder a batch; in place."""
        for store in (self._keys, self._values):
            for name, t in store.items():
                idx = torch.as_tensor(batch_indices, dtype=torch.long, device=t.device)
                store[name] = t.index_select(0, idx)

    reorder = select

    @classmethod
    def stacked(cls, caches: Sequence["KVCache"]) -> "KVCache":
        """One cache holding the sequences of `caches` one after the other (their batches
        concatenated, in order); every cache must hold the same layers and length."""
        out = cls()
        for name in caches[0]._keys:
            out._keys[name] = torch.cat([c._keys[name] for c in caches])
            out._values[name] = torch.cat([c._values[name] for c in caches])
        return out

    def pad_left(self, count: int) -> None:
        """Put `count` zero positions before every sequence's cached ones (in place), so
        that caches of different lengths can be `stacked`; the caller masks them out."""
        if count <= 0:
            return
        for store in (self._keys, self._values):
            for name, t in store.items():
                pad = t.new_zeros(t.shape[0], t.shape[1], count, t.shape[3])
                store[name] = torch.cat([pad, t], dim=2)

    def drop_left(self, count: int) -> None:
        """Forget the first `count` positions of every sequence (in place): padding that
        no sequence still in the cache attends to."""
        if count <= 0:
            return
        for store in (self._keys, self._values):
            for name, t in store.items():
                store[name] = t[:, :, count:]

    def reset(self) -> None:
        """Forget everything cached."""
        self._keys.clear()
        self._values.clear()

    def nbytes(self) -> int:
        """Bytes the cached tensors take."""
        return sum(t.numel() * t.element_size()
                   for store in (self._keys, self._values) for t in store.values())

    def __repr__(self) -> str:
        return (f"KVCache(layers={sorted(self._keys, key=int)}, length={self.length}, "
                f"batch={self.batch_size})")
