"""Qwen3-Next: a hybrid decoder — three gated-DeltaNet linear-attention layers to one
gated full-attention layer (`layer_types`, or every `full_attention_interval`-th layer) —
with Qwen2-MoE's sparse MLPs (softmax top-k, a sigmoid-gated shared expert).

* full attention: ``q_proj`` gives each head its query and a gate (``[..., heads, 2 *
  head_dim]``); zero-centred per-head q/k RMSNorms (``normed * (1 + w)``); partial RoPE
  (`partial_rotary_factor` 0.25 by default); the output multiplied by ``sigmoid(gate)``
  before ``o_proj``;
* linear attention: `GatedDeltaNet` (``linear_attn.``), a fixed recurrent state per
  sequence in the cache instead of keys and values, which the planner reserves as such;
* every RMSNorm is zero-centred, as Gemma's.

Checkpoints: one tensor per expert (the hub's and `save_pretrained`'s layout) or packed
(``mlp.experts.gate_up_proj``), each expert a byte range of those (`unpack_experts`); the
multi-token-prediction weights (``mtp.``) are not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache
from .common.attention import Attention, attend
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import GatedMLP, RMSNorm, activation
from .common.linear_attention import GatedDeltaNet
from .common.moe import SparseMoE, unpack_experts
from .common.rope import apply_rope
from .registry import ModelFamily, register_family

__all__ = ["Qwen3NextConfig", "Qwen3NextForCausalLM", "Qwen3NextDecoderLayer", "read_qwen3_next"]

# Qwen3NextConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 5632, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "head_dim": 256, "num_key_value_heads": 2}
LINEAR, FULL = "linear_attention", "full_attention"


@dataclass(frozen=True, kw_only=True)
class Qwen3NextConfig(DecoderConfig):
    """A Qwen3-Next decoder. Example::

        cfg = read_qwen3_next(json.load(open("Qwen3-Next-80B-A3B-Instruct/config.json")))
        cfg.linear_layers[:4], cfg.num_experts          # (True, True, True, False), 512
    """

    linear_layers: tuple[bool, ...] = ()
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    attention_bias: bool = False
    fused_linear_projections: bool = True   # Qwen3.5: in_proj_qkv, _z, _b, _a

    def is_sparse(self, layer_idx: int) -> bool:
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


def read_qwen3_next(d: dict[str, Any], *, defaults: dict[str, Any] | None = None, **extra) -> Qwen3NextConfig:
    """The `Qwen3NextConfig` of a config.json dict (`defaults`, `extra`: another type's,
    Qwen3.5's); ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=defaults or _DEFAULTS, rope_kw=dict(partial_rotary_factor=0.25))
    fields["nested_in"] = extra.pop("nested_in", None)
    activation(fields["hidden_act"])
    layers = fields["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:
        interval = positive_int(d, "full_attention_interval", 4)
        types = [LINEAR if (i + 1) % interval else FULL for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in (LINEAR, FULL) for t in types):
        raise ValueError(f"layer_types must list {LINEAR!r} or {FULL!r} for each of the {layers} "
                         f"layers, not {types!r}")
    only = d.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise ValueError(f"mlp_only_layers must be layer indices, not {only!r}")
    experts = d.get("num_experts", 512)
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 0:
        raise ValueError(f"num_experts must be an integer >= 0, not {experts!r}")
    top_k = positive_int(d, "num_experts_per_tok", 10)
    if experts and top_k > experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds num_experts ({experts})")
    k_heads = positive_int(d, "linear_num_key_heads", 16)
    v_heads = positive_int(d, "linear_num_value_heads", 32)
    if v_heads % k_heads:
        raise ValueError(f"linear_num_value_heads ({v_heads}) must be a multiple of "
                         f"linear_num_key_heads ({k_heads})")
    shared = d.get("shared_expert_intermediate_size", 512)   # 0 or null: no shared expert
    shared = positive_int(d, "shared_expert_intermediate_size", 512) if shared and experts else 0
    return Qwen3NextConfig(
        **fields, linear_layers=tuple(t == LINEAR for t in types),
        linear_num_key_heads=k_heads, linear_num_value_heads=v_heads,
        linear_key_head_dim=positive_int(d, "linear_key_head_dim", 128),
        linear_value_head_dim=positive_int(d, "linear_value_head_dim", 128),
        linear_conv_kernel_dim=positive_int(d, "linear_conv_kernel_dim", 4),
        num_experts=experts, num_experts_per_tok=top_k,
        moe_intermediate_size=positive_int(d, "moe_intermediate_size", 512),
        shared_expert_intermediate_size=shared,
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        decoder_sparse_step=positive_int(d, "decoder_sparse_step", 1), mlp_only_layers=tuple(only),
        attention_bias=bool(d.get("attention_bias", False)), **extra)


class GatedAttention(Attention):
    """Full attention whose output is gated per channel by ``sigmoid(gate)``, the gate
    coming with each head's query from ``q_proj`` (twice the usual width)."""

    def __init__(self, config: Qwen3NextConfig, layer_idx: int) -> None:
        d, eps = config.head_dim, config.rms_norm_eps
        super().__init__(hidden=config.hidden_size, heads=config.num_attention_heads,
                         kv_heads=config.num_key_value_heads, head_dim=d, layer_key=str(layer_idx),
                         qkv_bias=config.attention_bias, o_bias=config.attention_bias,
                         q_norm=RMSNorm(d, eps, style="gemma"), k_norm=RMSNorm(d, eps, style="gemma"),
                         rope_key="rotary_emb")
        self.q_proj = nn.Linear(config.hidden_size, 2 * config.num_attention_heads * d,
                                bias=config.attention_bias)

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, gate = self.q_proj(x).view(b, t, -1, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, *rope[:2])
        if cache is not None:
            k, v = cache.update(self.layer_key, k, v)
        out = attend(q, k, v, mask, scale=self.scale).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out * torch.sigmoid(gate.reshape(b, t, -1)))


class Qwen3NextDecoderLayer(DecoderLayer):
    """Pre-norm token mixer (``linear_attn`` or ``self_attn``) then pre-norm MLP."""

    def __init__(self, config: Qwen3NextConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, style="gemma")
        if config.linear_layers[layer_idx]:
            self.linear_attn = GatedDeltaNet(
                hidden=h, k_heads=config.linear_num_key_heads, v_heads=config.linear_num_value_heads,
                k_dim=config.linear_key_head_dim, v_dim=config.linear_value_head_dim,
                conv_kernel=config.linear_conv_kernel_dim, eps=eps, layer_key=str(layer_idx),
                act=config.hidden_act, fused=config.fused_linear_projections)
        else:
            self.self_attn = GatedAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps, style="gemma")
        if config.is_sparse(layer_idx):
            shared = GatedMLP(h, config.shared_expert_intermediate_size, act=config.hidden_act) \
                if config.shared_expert_intermediate_size else None
            self.mlp = SparseMoE(hidden=h, top_k=config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob,
                                 experts=[GatedMLP(h, config.moe_intermediate_size, act=config.hidden_act)
                                          for _ in range(config.num_experts)],
                                 shared_expert=shared, shared_expert_gate=shared is not None)
        else:
            self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if "linear_attn" in self._modules else self._modules["self_attn"]

    def __getattr__(self, name: str):
        if name == "self_attn" and "linear_attn" in self._modules:
            return self._modules["linear_attn"]   # what the skeleton asks of every layer
        return super().__getattr__(name)

    def kv_elements_per_token(self) -> int:
        return self.mixer.kv_elements_per_token()

    def kv_tokens_kept(self) -> int | None:
        return None

    def state_elements_per_sequence(self) -> int:
        return self.linear_attn.state_elements() if "linear_attn" in self._modules else 0

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.mixer(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3NextForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Qwen3NextDecoderLayer"]

    def __init__(self, config: Qwen3NextConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps, style="gemma")
        super().__init__(config, DecoderModel(config, Qwen3NextDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: Qwen3NextConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Without the multi-token-prediction weights (``mtp.``); packed experts as byte ranges."""
        own = {k: m for k, m in tensors.items() if not k.startswith("mtp.")}
        return super().checkpoint_tensors(config, unpack_experts(own, block="mlp"))


register_family(ModelFamily(("qwen3_next",), read_qwen3_next, Qwen3NextForCausalLM))
