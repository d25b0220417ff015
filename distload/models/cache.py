"""The key/value cache of one pipeline stage for one group of sequences, and the fixed-size
recurrent states of its linear-attention layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["KVCache"]


class KVCache:
    """Keys and values, after RoPE, of the layers of one stage, keyed by the layer's key in
    `model.layers` ("0".."N-1"); tensors are ``[batch, kv_heads, seq, head_dim]``.

    Growing by concatenation is O(seq) per step, which is fine next to a pipeline's
    communication and keeps the cache exactly as long as what was fed (no capacity to
    choose up front). A layer that attends to a window (or a chunk) of W tokens keeps only
    the last W - 1 (`update`'s `keep`): older ones can never be attended to again.

    A linear-attention layer (Qwen3-Next's gated DeltaNet) keeps instead a fixed-size
    state per sequence, whatever the length: named tensors ``[batch, ...]``
    (`set_state`/`state`), with the count of tokens it has seen.

    Continuous batching aligns caches of different lengths (`pad_left`, `stacked`,
    `drop_left`): a count of positions seen is then the group's, padding included, and a
    windowed layer still keeps only its last W - 1 positions of them.

    Example::

        cache = KVCache()
        logits = model(prompt_ids, position_ids=pos, cache=cache)   # prefill
        logits = model(next_ids, position_ids=pos[:, -1:] + 1, cache=cache)
        cache.length  # prompt length + 1
    """

    def __init__(self) -> None:
        self._keys: dict[str, torch.Tensor] = {}
        self._values: dict[str, torch.Tensor] = {}
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._seen: dict[str, int] = {}
        self._keep: dict[str, int | None] = {}   # a windowed layer's W - 1; None: all

    def update(self, layer_key: str, k: torch.Tensor, v: torch.Tensor, *, keep: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' `k`, `v` of layer `layer_key`; return its keys and values
        kept so far followed by the new tokens'. With `keep`, only the last `keep` tokens
        stay cached afterwards (a sliding window's W - 1)."""
        new = k.shape[2]
        if layer_key in self._keys:
            k = torch.cat([self._keys[layer_key], k], dim=2)
            v = torch.cat([self._values[layer_key], v], dim=2)
        drop = k.shape[2] - keep if keep is not None and k.shape[2] > keep else 0
        kept_k, kept_v = k[:, :, drop:], v[:, :, drop:]
        self._keys[layer_key], self._values[layer_key] = kept_k, kept_v
        self._seen[layer_key] = self._seen.get(layer_key, 0) + new
        self._keep[layer_key] = keep
        return k, v

    def state(self, layer_key: str) -> dict[str, torch.Tensor] | None:
        """The recurrent state of linear-attention layer `layer_key` (None before its first
        `set_state`)."""
        return self._states.get(layer_key)

    def set_state(self, layer_key: str, new_tokens: int, **tensors: torch.Tensor) -> None:
        """Replace layer `layer_key`'s recurrent state by `tensors` (each ``[batch, ...]``),
        after it has seen `new_tokens` more tokens."""
        self._states[layer_key] = dict(tensors)
        self._seen[layer_key] = self._seen.get(layer_key, 0) + new_tokens

    def seq_length(self, layer_key: str) -> int:
        """Tokens layer `layer_key` has seen (cached, or dropped from its window, or folded
        into its recurrent state; 0 before its first update)."""
        return self._seen.get(layer_key, 0)

    def kept_length(self, layer_key: str) -> int:
        """Tokens whose keys and values layer `layer_key` keeps (at most its window - 1)."""
        k = self._keys.get(layer_key)
        return 0 if k is None else k.shape[2]

    @property
    def length(self) -> int:
        """Tokens seen (the longest layer's count; all layers agree between forwards)."""
        return max(self._seen.values(), default=0)

    @property
    def batch_size(self) -> int | None:
        tensors = [*self._keys.values(), *(t for s in self._states.values() for t in s.values())]
        return next((t.shape[0] for t in tensors), None)

    def select(self, batch_indices: Sequence[int] | torch.Tensor) -> None:
        """Keep only the sequences `batch_indices` (in that order), e.g. to drop finished
        ones or to reorder a batch; in place."""
        for store in (self._keys, self._values, *self._states.values()):
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
        for name, state in caches[0]._states.items():
            out._states[name] = {k: torch.cat([c._states[name][k] for c in caches]) for k in state}
        out._seen, out._keep = dict(caches[0]._seen), dict(caches[0]._keep)
        return out

    def pad_left(self, count: int) -> None:
        """Put `count` zero positions before every sequence's cached ones (in place), so
        that caches of different lengths can be `stacked`; the caller masks them out. Every
        layer counts them as seen; a windowed layer keeps at most its W - 1 positions, the
        padding among them only while its sequences are shorter than that."""
        if count <= 0:
            return
        for name in self._seen:
            self._seen[name] += count
        for store in (self._keys, self._values):
            for name, t in store.items():
                keep = self._keep.get(name)
                want = self._seen[name] if keep is None else min(self._seen[name], keep)
                if want > t.shape[2]:
                    pad = t.new_zeros(t.shape[0], t.shape[1], want - t.shape[2], t.shape[3])
                    store[name] = torch.cat([pad, t], dim=2)

    def drop_left(self, count: int) -> None:
        """Forget the first `count` positions of every sequence (in place): padding that
        no sequence still in the cache attends to. A windowed layer, which keeps only its
        last positions, loses those of them that were among the first `count`."""
        if count <= 0:
            return
        for name in self._seen:
            self._seen[name] = max(self._seen[name] - count, 0)
        for store in (self._keys, self._values):
            for name, t in store.items():
                extra = t.shape[2] - self._seen[name]
                if extra > 0:
                    store[name] = t[:, :, extra:]

    def reset(self) -> None:
        """Forget everything cached."""
        self._keys.clear()
        self._values.clear()
        self._states.clear()
        self._seen.clear()
        self._keep.clear()

    def nbytes(self) -> int:
        """Bytes the cached tensors take."""
        return sum(t.numel() * t.element_size()
                   for store in (self._keys, self._values, *self._states.values()) for t in store.values())

    def __repr__(self) -> str:
        return (f"KVCache(layers={sorted({*self._keys, *self._states}, key=int)}, length={self.length}, "
                f"batch={self.batch_size})")
