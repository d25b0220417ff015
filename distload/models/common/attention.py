"""Self-attention as the built-in families need it: grouped-query heads, separate or fused
q/k/v projections, optional q/k norms, RoPE (or none), sliding windows, logit soft-capping
and any scale — with the additive masks that left padding and a KV cache need.

Example::

    attn = Attention(hidden=64, heads=4, kv_heads=2, head_dim=24, layer_key="0")
    mask = attention_mask_bias(pad_mask, q_len=8, past=0, dtype=x.dtype, device=x.device)
    out = attn(x, rope=(cos, sin), mask=mask, cache=cache)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache
from .rope import apply_rope

__all__ = ["attention_mask_bias", "attend", "Attention", "position_ids_from_mask", "trim_mask"]


def attention_mask_bias(
    attention_mask: torch.Tensor | None,
    *,
    q_len: int,
    past: int,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    always: bool = False,
) -> torch.Tensor | None:
    """The additive attention bias ``[B or 1, 1, q_len, past + q_len]``: 0 where a query
    may look, the dtype's min elsewhere (causal, padding, sliding window), or None when
    plain causal attention from position 0 (SDPA's `is_causal`) says it all (never None
    with `always`).

    Queries are the last `q_len` of ``past + q_len`` cache slots; `attention_mask` is 0/1
    over all those slots. A window of W lets a query see itself and the W - 1 slots
    before it, as transformers' sliding-window masks do. A `chunk_size` of C (Llama 4's
    chunked attention) lets a query see only the slots of its own chunk of C tokens,
    counted from each row's first real token (as transformers counts them past the left
    padding). Example::

        bias = attention_mask_bias(torch.tensor([[0, 1, 1]]), q_len=3, past=0,
                                   dtype=torch.float32, device=torch.device("cpu"))
    """
    if attention_mask is None and sliding_window is None and chunk_size is None and past == 0 \
            and not always:
        return None
    kv_len = past + q_len
    q_idx = torch.arange(past, kv_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    allowed = kv_idx <= q_idx
    if sliding_window is not None:
        allowed = allowed & (kv_idx > q_idx - sliding_window)
    allowed = allowed[None, None]
    if chunk_size is not None:
        lead = torch.zeros(1, dtype=torch.long, device=device) if attention_mask is None else \
            (attention_mask.to(device).long().cumsum(-1) == 0).sum(-1)   # left padding per row
        q_chunk = (q_idx[None] - lead[:, None, None]).div(chunk_size, rounding_mode="floor")
        kv_chunk = (kv_idx[None] - lead[:, None, None]).div(chunk_size, rounding_mode="floor")
        allowed = allowed & (q_chunk == kv_chunk)[:, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    # min, not -inf: a padding query that sees nothing gets a uniform softmax, not NaN.
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
           scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Attention of `q` ``[B, H, T, D]`` over `k`, `v` ``[B, KV, S, D]`` (GQA: each kv
    head serves ``H / KV`` query heads) with the additive `mask` (None: causal from slot
    0). With `softcap` the scores are ``cap * tanh(scores / cap)`` before the mask, in the
    activations' dtype with a float32 softmax, as transformers' eager attention does.
    `sinks` ``[H]`` (gpt-oss) are one extra logit per head that joins each row's softmax
    and is then dropped: a row may give part of its weight to nothing."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if sinks is not None:
        return _attend_with_sinks(q, k, v, mask, scale=scale, sinks=sinks)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=mask is None and q.shape[2] > 1, scale=scale)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and q.shape[2] > 1:
        mask = attention_mask_bias(None, q_len=q.shape[2], past=k.shape[2] - q.shape[2],
                                   dtype=scores.dtype, device=scores.device, always=True)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       *, scale: float, sinks: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is None and q.shape[2] > 1:
        mask = attention_mask_bias(None, q_len=q.shape[2], past=k.shape[2] - q.shape[2],
                                   dtype=scores.dtype, device=scores.device, always=True)
    if mask is not None:
        scores = scores + mask
    sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values  # as transformers: no overflow
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


class Attention(nn.Module):
    """Grouped-query self-attention of one decoder layer; writes its keys and values
    (after RoPE) to a `KVCache` under `layer_key`.

    Weights: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` or, `fused_qkv`, one
    ``qkv_proj`` (query rows, then key, then value; Phi-3). `q_norm`/`k_norm` are applied
    per head (``[..., heads, head_dim]``: Qwen3, Gemma 3, Cohere) or, with
    `norm_full_width`, to the whole projection before it is split into heads (OLMo 2), or,
    `norm_after_rope`, per head after RoPE (HunYuan).
    `rope_key` names the model's rotary table this layer uses (None: no RoPE, SmolLM3's
    every 4th layer); `sliding_window` its window (None: global); `attention_chunk` its
    chunk (Llama 4's chunked layers). `clip_qkv` clamps queries, keys and values (OLMoE);
    `sinks` adds one learned sink logit per head (``sinks`` ``[heads]``, gpt-oss). A
    rotary table may return a third tensor, a per-position query scale ``[B, 1, T, 1]``
    applied after RoPE (Ministral 3's long-context temperature). A family with another
    projection layout overrides `project`.
    """

    def __init__(self, *, hidden: int, heads: int, kv_heads: int, head_dim: int, layer_key: str,
                 qkv_bias: bool = False, o_bias: bool = False, fused_qkv: bool = False,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 norm_full_width: bool = False, scale: float | None = None,
                 softcap: float | None = None, sliding_window: int | None = None,
                 rope_key: str | None = "default", interleaved_rope: bool = False,
                 rope_upcast: bool = False, attention_chunk: int | None = None,
                 clip_qkv: float | None = None, sinks: bool = False,
                 norm_after_rope: bool = False) -> None:
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of "
                             f"num_key_value_heads ({kv_heads})")
        self.layer_key = layer_key
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.softcap, self.sliding_window, self.rope_key = softcap, sliding_window, rope_key
        self.interleaved_rope, self.rope_upcast = interleaved_rope, rope_upcast
        self.norm_full_width, self.norm_after_rope = norm_full_width, norm_after_rope
        self.attention_chunk, self.clip_qkv = attention_chunk, clip_qkv
        q_out, kv_out = heads * head_dim, kv_heads * head_dim
        if fused_qkv:
            self.qkv_proj = nn.Linear(hidden, q_out + 2 * kv_out, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(hidden, q_out, bias=qkv_bias)
            self.k_proj = nn.Linear(hidden, kv_out, bias=qkv_bias)
            self.v_proj = nn.Linear(hidden, kv_out, bias=qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=o_bias)
        self.fused_qkv = fused_qkv
        if q_norm is not None:
            self.q_norm, self.k_norm = q_norm, k_norm
        if sinks:
            self.sinks = nn.Parameter(torch.zeros(heads))

    @classmethod
    def for_layer(cls, config, layer_idx: int, **switches) -> "Attention":
        """The attention of layer `layer_idx` of a `DecoderConfig`: its sizes, its key, its
        window (``config.layer_sliding_window``) and the model's `rotary_emb`, with the
        family's `switches` on top.

        Example::

            Attention.for_layer(cfg, 3, qkv_bias=True)
        """
        kw = dict(hidden=config.hidden_size, heads=config.num_attention_heads,
                  kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                  layer_key=str(layer_idx), sliding_window=config.layer_sliding_window(layer_idx),
                  rope_key="rotary_emb")
        return cls(**(kw | switches))

    def kv_elements_per_token(self) -> int:
        """Elements the KV cache keeps per token for this layer."""
        return 2 * self.num_kv_heads * self.head_dim

    def kv_keep(self) -> int | None:
        """Tokens this layer's cache keeps at most: its window's or chunk's W - 1 (a query
        sees itself and at most W - 1 earlier tokens); None: all."""
        spans = [w for w in (self.sliding_window, getattr(self, "attention_chunk", None)) if w]
        return min(spans) - 1 if spans else None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[B, T, heads * head_dim]`` of `x`."""
        if self.fused_qkv:
            q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return self.qkv_proj(x).split([q_out, kv_out, kv_out], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...] | None,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x)
        has_norm = hasattr(self, "q_norm")
        if has_norm and self.norm_full_width:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (y.clamp(-self.clip_qkv, self.clip_qkv) for y in (q, k, v))
        q, k, v = (y.view(b, t, -1, self.head_dim) for y in (q, k, v))
        if has_norm and not self.norm_full_width and not self.norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, k, *rope[:2], interleaved=self.interleaved_rope, upcast=self.rope_upcast)
            if len(rope) > 2:
                q = q * rope[2].to(q.dtype)
        if has_norm and self.norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.update(self.layer_key, k, v, keep=self.kv_keep())
            mask = trim_mask(mask, k.shape[2])
        out = attend(q, k, v, mask, scale=self.scale, softcap=self.softcap,
                     sinks=getattr(self, "sinks", None))
        return self.output(out.transpose(1, 2).reshape(b, t, -1))

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' concatenated outputs ``[B, T, heads * head_dim]`` → ``o_proj`` (a family
        that normalizes them first overrides this: BitNet)."""
        return self.o_proj(out)


def trim_mask(mask: torch.Tensor | None, kv_len: int) -> torch.Tensor | None:
    """`mask` over the last `kv_len` slots: a windowed layer's cache has dropped the older
    ones, which no query of this call could see."""
    return mask if mask is None or mask.shape[-1] <= kv_len else mask[..., -kv_len:]


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
