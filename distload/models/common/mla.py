"""Multi-head latent attention (MLA: DeepSeek-V2, DeepSeek-V3 and the models built on them):
keys and values are compressed into one latent per token, shared by every head, and RoPE
is decoupled onto a few extra channels of one shared key.

    q        = q_proj(x)  or  q_b_proj(q_a_layernorm(q_a_proj(x)))        [B, H, T, nope + rope]
    latent   = kv_a_layernorm(kv_a_proj_with_mqa(x)[:kv_lora_rank])       [B, 1, T, kv_lora_rank]
    k_rot    = rope(kv_a_proj_with_mqa(x)[kv_lora_rank:])                 [B, 1, T, rope]
    k, v     = kv_b_proj(latent) split per head, k = [k_nope, k_rot]

The KV cache holds the latent and the rotated shared key (``kv_lora_rank +
qk_rope_head_dim`` elements per token and layer, not ``2 * heads * head_dim``), as
transformers' does; the per-head keys and values are expanded from it on every forward.
The softmax scale is ``(nope + rope) ** -0.5``, times YaRN's ``mscale(factor,
mscale_all_dim) ** 2`` where the RoPE is YaRN (`mla_softmax_scale`).

Example::

    attn = LatentAttention(hidden=64, heads=4, q_lora_rank=24, kv_lora_rank=16,
                           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, layer_key="0")
    out = attn(x, rope=(cos, sin), mask=mask, cache=cache)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..cache import KVCache
from .attention import attend
from .layers import RMSNorm
from .rope import RopeParams, apply_rope

__all__ = ["LatentAttention", "mla_softmax_scale"]


def mla_softmax_scale(qk_head_dim: int, rope: RopeParams) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale ** 2`` with YaRN's `mscale_all_dim` (DeepSeek's
    reference code scales the whole ``q @ k`` product, not only the rotary channels)."""
    scale = qk_head_dim ** -0.5
    if rope.rope_type != "default" and rope.mscale_all_dim and rope.factor and rope.factor > 1:
        mscale = 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale *= mscale * mscale
    return scale


class LatentAttention(nn.Module):
    """MLA of one decoder layer (see the module doc), with transformers' weight names.
    `q_lora_rank` None: a plain ``q_proj`` (DeepSeek-V2-Lite). `bias` puts biases on
    ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` (``attention_bias``). The latent
    norms use eps 1e-6, as transformers builds them whatever the config's. `interleaved_rope`
    rotates channel pairs (DeepSeek's layout); `rope_upcast` rotates in float32 (V2's
    complex multiply)."""

    sliding_window = None

    def __init__(self, *, hidden: int, heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, layer_key: str,
                 scale: float | None = None, bias: bool = False, interleaved_rope: bool = True,
                 rope_upcast: bool = False, rope_key: str | None = "rotary_emb") -> None:
        super().__init__()
        self.layer_key, self.rope_key = layer_key, rope_key
        self.num_heads, self.kv_lora_rank = heads, kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = qk_head_dim ** -0.5 if scale is None else scale
        self.interleaved_rope, self.rope_upcast = interleaved_rope, rope_upcast
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(q_lora_rank, heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_head_dim, hidden, bias=bias)

    def kv_elements_per_token(self) -> int:
        """The cache keeps the latent and the shared rotated key, nothing per head."""
        return self.kv_lora_rank + self.rope_dim

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else \
            self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.num_heads, self.nope + self.rope_dim).transpose(1, 2)
        q_pass, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(b, 1, t, self.kv_lora_rank)
        k_rot = k_rot.reshape(b, 1, t, self.rope_dim)
        if rope is not None:
            q_rot, k_rot = apply_rope(q_rot, k_rot, *rope, interleaved=self.interleaved_rope,
                                      upcast=self.rope_upcast)
        if cache is not None:  # the compressed latent is what is kept
            latent, k_rot = cache.update(self.layer_key, latent, k_rot)
        s = latent.shape[2]
        kv = self.kv_b_proj(latent).view(b, s, self.num_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, self.num_heads, -1, -1)), dim=-1)
        q = torch.cat((q_pass, q_rot), dim=-1)
        out = attend(q, k, v, mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.v_dim))
