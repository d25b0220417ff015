"""Falcon (TII's falcon-7b/40b/180b and the models trained from them), with RoPE: one
fused ``query_key_value`` projection, attention and MLP side by side, layer norms, a GELU
MLP (``ffn_hidden_size``), no biases by default, a head tied to the token embeddings.

Three layouts of the fused projection, as the config says:

* ``new_decoder_architecture`` (40B, 180B): grouped by key/value head, each group's
  queries then its key and value (``num_kv_heads`` groups), and two layer norms per
  layer (``ln_attn``, ``ln_mlp``; ``num_ln_in_parallel_attn``);
* ``multi_query`` (7B): every query head, then one key and one value head;
* otherwise: per head ``[q_h, k_h, v_h]`` (GPT-NeoX's layout).

The old layout runs attention and MLP in parallel on one layer norm (``parallel_attn``),
or in series with a second one. The ALiBi variant (``alibi``: falcon-rw) is refused by
name. Checkpoint names are Falcon's own (``transformer.h.{i}.self_attention...``), mapped
onto the shared skeleton's (whole tensors renamed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint.types import TensorMeta
from .cache import KVCache
from .common.attention import Attention
from .common.config import DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, rename_tensors
from .common.layers import PlainMLP, activation
from .gpt_neox import GPTNeoXAttention
from .registry import ModelFamily, register_family

__all__ = ["FalconConfig", "FalconForCausalLM", "FalconDecoderLayer", "read_falcon"]

# FalconConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"vocab_size": 65024, "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71,
             "max_position_embeddings": 2048, "layer_norm_epsilon": 1e-5, "activation": "gelu",
             "bos_token_id": 11, "eos_token_id": 11}
_SWITCHES = ("new_decoder_architecture", "multi_query", "parallel_attn", "bias", "alibi")

_NAMES = ((r"^transformer\.word_embeddings\.", "model.embed_tokens."),
          (r"^transformer\.ln_f\.", "model.norm."),
          (r"^transformer\.h\.(\d+)\.self_attention\.query_key_value\.", r"model.layers.\1.self_attn.qkv_proj."),
          (r"^transformer\.h\.(\d+)\.self_attention\.dense\.", r"model.layers.\1.self_attn.o_proj."),
          (r"^transformer\.h\.(\d+)\.mlp\.dense_h_to_4h\.", r"model.layers.\1.mlp.c_fc."),
          (r"^transformer\.h\.(\d+)\.mlp\.dense_4h_to_h\.", r"model.layers.\1.mlp.c_proj."),
          (r"^transformer\.h\.(\d+)\.", r"model.layers.\1."))


@dataclass(frozen=True, kw_only=True)
class FalconConfig(DecoderConfig):
    """A Falcon decoder (`rms_norm_eps` holds `layer_norm_epsilon`). Example::

        cfg = read_falcon(json.load(open("falcon-7b/config.json")))
        cfg.multi_query, cfg.num_key_value_heads      # True, 1
    """

    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    bias: bool = False
    num_ln_in_parallel_attn: int = 1


def read_falcon(d: dict[str, Any]) -> FalconConfig:
    """The `FalconConfig` of a config.json dict; ValueError naming an unsupported field."""
    d = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None or k not in _DEFAULTS}}
    switches = {k: d.get(k, k in ("multi_query", "parallel_attn")) for k in _SWITCHES}
    for key, value in switches.items():
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    if switches["alibi"]:
        raise ValueError("alibi: Falcon's ALiBi variant (falcon-rw) is not supported; its RoPE models are")
    new = switches["new_decoder_architecture"]
    hidden = positive_int(d, "hidden_size")
    ffn = d.get("ffn_hidden_size")
    d.pop("head_dim", None)
    fields = read_decoder({**d, "intermediate_size": 4 * hidden if ffn is None else positive_int(d, "ffn_hidden_size"),
                           "hidden_act": d["activation"], "num_key_value_heads": None},
                          defaults={"tie_word_embeddings": True}, eps_key="layer_norm_epsilon")
    activation(fields["hidden_act"], "activation")
    heads = fields["num_attention_heads"]
    if fields["head_dim"] * heads != hidden:
        raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
    kv_heads = 1 if switches["multi_query"] else heads   # the old layout's
    if new:
        kv_heads = heads if d.get("num_kv_heads") is None else positive_int(d, "num_kv_heads")
        if heads % kv_heads:
            raise ValueError(f"num_kv_heads ({kv_heads}) must divide num_attention_heads ({heads})")
    fields["num_key_value_heads"] = kv_heads
    lns = d.get("num_ln_in_parallel_attn")
    lns = (2 if new else 1) if lns is None else lns
    if lns not in (1, 2):
        raise ValueError(f"num_ln_in_parallel_attn must be 1 or 2, got {lns!r}")
    if new and lns == 1 and not switches["parallel_attn"]:
        raise ValueError("parallel_attn: false with new_decoder_architecture and one layer norm has no "
                         "MLP input in transformers either")
    return FalconConfig(**fields, **{k: v for k, v in switches.items() if k != "alibi"},
                        num_ln_in_parallel_attn=lns if new else 1)


class GroupedQKVAttention(Attention):
    """The new architecture's fused projection: per key/value head, its group's queries,
    then its key, then its value."""

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        grouped = self.qkv_proj(x).view(b, t, self.num_kv_heads, -1, self.head_dim)
        return (grouped[..., :-2, :].reshape(b, t, -1), grouped[..., -2, :].reshape(b, t, -1),
                grouped[..., -1, :].reshape(b, t, -1))


class FalconDecoderLayer(DecoderLayer):
    """``x + attn(ln(x)) + mlp(ln'(x))`` (parallel; ln' = ln unless there are two), or
    ``y = x + attn(ln(x)); y + mlp(post_attention_layernorm(y))`` (serial, old layout)."""

    def __init__(self, config: FalconConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.parallel = config.new_decoder_architecture or config.parallel_attn
        if config.num_ln_in_parallel_attn == 2:
            self.ln_attn, self.ln_mlp = nn.LayerNorm(h, eps=eps), nn.LayerNorm(h, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(h, eps=eps)
            if not self.parallel:
                self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        layout = GroupedQKVAttention if config.new_decoder_architecture else \
            Attention if config.multi_query else GPTNeoXAttention
        self.self_attn = layout.for_layer(config, layer_idx, fused_qkv=True, qkv_bias=config.bias,
                                          o_bias=config.bias)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act, bias=config.bias)

    def forward(self, x: torch.Tensor, *, rope, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        two = hasattr(self, "ln_attn")
        normed = self.ln_attn(x) if two else self.input_layernorm(x)
        attn = self.self_attn(normed, rope, mask, cache)
        if self.parallel:
            return x + attn + self.mlp(self.ln_mlp(x) if two else normed)
        y = x + attn
        return y + self.mlp(self.post_attention_layernorm(y))


class FalconForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["FalconDecoderLayer"]

    def __init__(self, config: FalconConfig) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, FalconDecoderLayer, norm=norm))

    @classmethod
    def checkpoint_tensors(cls, config: FalconConfig, tensors: Mapping[str, TensorMeta]
                           ) -> Mapping[str, TensorMeta]:
        """Falcon's names onto the skeleton's."""
        return rename_tensors(tensors, _NAMES)


register_family(ModelFamily(("falcon",), read_falcon, FalconForCausalLM))
