"""Llama 4's text model (llama4_text, and the text part of the hub's multimodal llama4
checkpoints): a decoder whose RoPE layers use chunked attention
and whose every `no_rope_layer_interval`-th layer is a global NoPE layer, with mixture-of-
experts feed-forwards interleaved with dense ones.

* RoPE layers (``no_rope_layers[i] == 1``): interleaved-pair RoPE in float32, then a
  weightless RMS norm of queries and keys (`use_qk_norm`), attention within chunks of
  `attention_chunk_size` tokens (counted from each row's first real token);
* NoPE layers: global attention, queries scaled by ``1 + attn_scale * log1p(floor((i +
  1) / floor_scale))`` for cache slot i (`attn_temperature_tuning`);
* feed-forward: MoE on `moe_layers` (every `interleave_moe_layer_step`-th by default),
  else a dense SwiGLU of `intermediate_size_mlp`. The MoE routes each token to the top-k
  router logits, scales its *input* to each chosen expert by ``sigmoid(logit)``, and adds
  an always-on ``shared_expert``;
* experts are stored packed, ``feed_forward.experts.gate_up_proj`` ``[E, H, 2I]`` (gate
  columns, then up) and ``down_proj`` ``[E, I, H]`` (the hub's and `save_pretrained`'s
  layout): the model keeps them as parameters under those names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cache import KVCache
from .common.attention import Attention, attend, trim_mask
from .common.config import DecoderConfig, positive_int, read_decoder, text_config
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel
from .common.layers import GatedMLP, RMSNorm, activation, linear_flops, linear_outputs
from .common.rope import apply_rope
from .common.routing import run_experts
from .registry import ModelFamily, register_family

__all__ = ["Llama4TextConfig", "Llama4ForCausalLM", "Llama4DecoderLayer", "read_llama4_text", "read_llama4"]

# Llama4TextConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 8192, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
             "head_dim": 128, "num_key_value_heads": 8, "rope_theta": 500000.0, "bos_token_id": 1,
             "eos_token_id": 2}


@dataclass(frozen=True, kw_only=True)
class Llama4TextConfig(DecoderConfig):
    """A Llama 4 text decoder. Example::

        cfg = read_llama4_text(json.load(open("Llama-4-Scout-17B-16E/config.json"))["text_config"])
        cfg.use_rope[3], cfg.is_moe(0)            # False, True
    """

    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    intermediate_size_mlp: int = 16384
    moe_layers: tuple[int, ...] = ()
    use_rope: tuple[bool, ...] = ()
    attention_chunk_size: int | None = 8192
    chunked_layers: tuple[bool, ...] = ()     # per layer: chunked attention, else global
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    attention_bias: bool = False

    def is_moe(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layers


def _indices(d: dict[str, Any], key: str) -> list[int] | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"{key} must be a list of integers, not {value!r}")
    return value


def read_llama4_text(d: dict[str, Any], *, nested_in: str | None = None) -> Llama4TextConfig:
    """The `Llama4TextConfig` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    layers = fields["num_hidden_layers"]
    interval = positive_int(d, "no_rope_layer_interval", 4)
    flags = _indices(d, "no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(flags) != layers:
        raise ValueError(f"no_rope_layers has {len(flags)} entries for {layers} layers")
    step = positive_int(d, "interleave_moe_layer_step", 1)
    moe = _indices(d, "moe_layers")
    moe = list(range(step - 1, layers, step)) if moe is None else moe
    chunk = d.get("attention_chunk_size", 8192)
    chunk = None if chunk is None else positive_int(d, "attention_chunk_size")
    types = d.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != layers
                              or any(t not in ("chunked_attention", "full_attention") for t in types)):
        raise ValueError(f"layer_types must list 'chunked_attention' or 'full_attention' for each of "
                         f"the {layers} layers, not {types!r}")
    chunked = [t == "chunked_attention" for t in types] if types else [bool(f) and chunk is not None for f in flags]

    def number(key: str, default: float) -> float:
        value = d.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{key} must be a positive number, not {value!r}")
        return float(value)

    experts = positive_int(d, "num_local_experts", 16)
    top_k = positive_int(d, "num_experts_per_tok", 1)
    if top_k > experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})")
    return Llama4TextConfig(
        **fields | {"nested_in": nested_in}, num_local_experts=experts, num_experts_per_tok=top_k,
        intermediate_size_mlp=positive_int(d, "intermediate_size_mlp", 16384),
        moe_layers=tuple(moe), use_rope=tuple(bool(f) for f in flags),
        attention_chunk_size=chunk, chunked_layers=tuple(chunked),
        use_qk_norm=bool(d.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(d.get("attn_temperature_tuning", True)),
        floor_scale=number("floor_scale", 8192), attn_scale=number("attn_scale", 0.1),
        attention_bias=bool(d.get("attention_bias", False)))


class Llama4Attention(Attention):
    """Llama 4's attention: RoPE then a weightless RMS norm of q and k on RoPE layers; the
    position temperature on NoPE layers (it needs the cache slots, so it is computed here)."""

    def __init__(self, config: Llama4TextConfig, layer_idx: int, *, chunked: bool) -> None:
        use_rope = config.use_rope[layer_idx]
        super().__init__(hidden=config.hidden_size, heads=config.num_attention_heads,
                         kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                         layer_key=str(layer_idx), qkv_bias=config.attention_bias,
                         o_bias=config.attention_bias, rope_key="rotary_emb" if use_rope else None,
                         interleaved_rope=True, rope_upcast=True,
                         attention_chunk=config.attention_chunk_size if chunked else None)
        self.qk_l2_norm = use_rope and config.use_qk_norm
        self.eps = config.rms_norm_eps
        self.temperature = (config.floor_scale, config.attn_scale) \
            if config.attn_temperature_tuning and not use_rope else None

    def _l2(self, x: torch.Tensor) -> torch.Tensor:
        f = x.float()
        return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, -1, self.head_dim).transpose(1, 2) for y in self.project(x))
        if rope is not None:
            q, k = apply_rope(q, k, *rope[:2], interleaved=True, upcast=True)
        if self.qk_l2_norm:
            q, k = self._l2(q), self._l2(k)
        if self.temperature is not None:
            floor, scale = self.temperature
            past = cache.seq_length(self.layer_key) if cache is not None else 0
            slots = torch.arange(past, past + t, device=x.device, dtype=torch.float32)
            q = (q * (torch.log1p(torch.floor((slots + 1.0) / floor)) * scale + 1.0)[:, None]).to(q.dtype)
        if cache is not None:
            k, v = cache.update(self.layer_key, k, v, keep=self.kv_keep())
            mask = trim_mask(mask, k.shape[2])
        out = attend(q, k, v, mask, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Llama4Experts(nn.Module):
    """The packed experts under the checkpoint's names and layout."""

    def __init__(self, config: Llama4TextConfig) -> None:
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(e, h, 2 * i))
        self.down_proj = nn.Parameter(torch.zeros(e, i, h))
        self.act = activation(config.hidden_act)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * self.act(gate)) @ self.down_proj[e]


class Llama4MoE(nn.Module):
    """``router`` (bias-free Linear), packed ``experts`` and ``shared_expert``."""

    def __init__(self, config: Llama4TextConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(h, config.num_local_experts, bias=False)
        self.experts = Llama4Experts(config)
        self.shared_expert = GatedMLP(h, config.intermediate_size, act=config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        top, chosen = torch.topk(logits, self.top_k, dim=1)
        weights = torch.sigmoid(top.float()).to(logits.dtype)
        routed = run_experts(flat, self.experts.expert, weights, chosen, scale_inputs=True)
        return (self.shared_expert(flat) + routed).view(x.shape)

    def active_flops(self) -> float:
        per_expert = linear_flops(self.shared_expert)   # routed experts have the shared one's shape
        return linear_flops(self.router) + (1 + self.top_k) * per_expert

    def active_activations(self) -> int:
        return linear_outputs(self.router) + (1 + self.top_k) * linear_outputs(self.shared_expert)


class Llama4DecoderLayer(DecoderLayer):
    def __init__(self, config: Llama4TextConfig, layer_idx: int, *, chunked: bool) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Llama4Attention(config, layer_idx, chunked=chunked)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.feed_forward = Llama4MoE(config) if config.is_moe(layer_idx) \
            else GatedMLP(h, config.intermediate_size_mlp, act=config.hidden_act)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class Llama4ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Llama4DecoderLayer"]

    def __init__(self, config: Llama4TextConfig) -> None:
        chunked = config.chunked_layers
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(
            config, lambda c, i: Llama4DecoderLayer(c, i, chunked=chunked[i]), norm=norm,
            interleaved_rope=True))


def read_llama4(d: dict[str, Any]) -> Llama4TextConfig:
    """The text model of a Llama 4 multimodal config.json (``model_type: llama4``, the hub's
    Scout and Maverick), whose weights sit under ``language_model.``; the vision tower is
    not read."""
    text = text_config(d, "llama4", "llama4_text")
    return read_llama4_text(text, nested_in="llama4")


register_family(ModelFamily(("llama4_text",), read_llama4_text, Llama4ForCausalLM))
register_family(ModelFamily(("llama4",), read_llama4, Llama4ForCausalLM, nested_text=True))
