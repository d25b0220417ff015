"""StarCoder2: layer norms with biases (`norm_epsilon`), biases on every projection
(`use_bias`), a plain two-matrix MLP (``c_fc``, ``c_proj``, gelu-tanh), tied embeddings
by default, and a sliding window on every layer when `sliding_window` is set.

    ids -> embed_tokens -> [input_layernorm -> self_attn -> +residual
                            -> post_attention_layernorm -> mlp -> +residual] x N -> norm -> lm_head
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .common.attention import Attention
from .common.config import DecoderConfig, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import PlainMLP, activation
from .registry import ModelFamily, register_family

__all__ = ["Starcoder2Config", "Starcoder2ForCausalLM", "Starcoder2DecoderLayer", "read_starcoder2"]

# Starcoder2Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 12288, "max_position_embeddings": 4096, "num_key_value_heads": 2,
             "norm_epsilon": 1e-5, "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True,
             "bos_token_id": 50256, "eos_token_id": 50256}


@dataclass(frozen=True, kw_only=True)
class Starcoder2Config(DecoderConfig):
    """A StarCoder2 decoder (`rms_norm_eps` holds its layer norms' epsilon). Example::

        cfg = read_starcoder2(json.load(open("starcoder2-15b/config.json")))
    """

    use_bias: bool = True


def read_starcoder2(d: dict[str, Any]) -> Starcoder2Config:
    """The `Starcoder2Config` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS, eps_key="norm_epsilon")
    activation(fields["hidden_act"])
    window = d.get("sliding_window")
    return Starcoder2Config(**fields, sliding_window=None if window is None else int(window),
                            use_bias=bool(d.get("use_bias", True)))


class Starcoder2DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Starcoder2Config, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.use_bias
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=bias, o_bias=bias)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = PlainMLP(h, config.intermediate_size, act=config.hidden_act, bias=bias)


class Starcoder2ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["Starcoder2DecoderLayer"]

    def __init__(self, config: Starcoder2Config) -> None:
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, Starcoder2DecoderLayer, norm=norm))


register_family(ModelFamily(("starcoder2",), read_starcoder2, Starcoder2ForCausalLM))
