"""SmolLM3: a Llama decoder in which some layers use no positional embedding at all
(`no_rope_layers[i] == 0`; by default every `no_rope_layer_interval`-th layer, i.e. every
4th), optional sliding-window layers (`layer_types`), and tied embeddings by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from .common.attention import Attention
from .common.config import FULL, SLIDING, DecoderConfig, positive_int, read_decoder
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import GatedMLP, RMSNorm, activation
from .registry import ModelFamily, register_family

__all__ = ["SmolLM3Config", "SmolLM3ForCausalLM", "SmolLM3DecoderLayer", "read_smollm3"]

# SmolLM3Config's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 11008, "max_position_embeddings": 32768, "num_key_value_heads": 4,
             "rope_theta": 2e6, "tie_word_embeddings": True, "pad_token_id": 128004,
             "bos_token_id": 128000, "eos_token_id": 128001}


@dataclass(frozen=True, kw_only=True)
class SmolLM3Config(DecoderConfig):
    """A SmolLM3 decoder; `use_rope[i]` says whether layer i applies RoPE. Example::

        cfg = read_smollm3(json.load(open("SmolLM3-3B/config.json")))
        cfg.use_rope[:4]        # (True, True, True, False)
    """

    use_rope: tuple[bool, ...] = ()
    attention_bias: bool = False
    mlp_bias: bool = False


def read_smollm3(d: dict[str, Any]) -> SmolLM3Config:
    """The `SmolLM3Config` of a config.json dict; ValueError naming an unsupported field."""
    fields = read_decoder(d, defaults=_DEFAULTS)
    activation(fields["hidden_act"])
    layers = fields["num_hidden_layers"]
    interval = positive_int(d, "no_rope_layer_interval", 4)
    flags = d.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if not isinstance(flags, list) or len(flags) != layers:
        raise ValueError(f"no_rope_layers has {len(flags)} entries for {layers} layers")
    window = d.get("sliding_window")
    layer_types = d.get("layer_types") or [
        SLIDING if d.get("use_sliding_window") and window is not None and not flags[i] else FULL
        for i in range(layers)]
    sliding = SLIDING in layer_types and window is not None
    return SmolLM3Config(**fields, use_rope=tuple(bool(f) for f in flags),
                         sliding_window=int(window) if sliding else None,
                         layer_types=tuple(layer_types) if sliding else None,
                         attention_bias=bool(d.get("attention_bias", False)),
                         mlp_bias=bool(d.get("mlp_bias", False)))


class SmolLM3DecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: SmolLM3Config, layer_idx: int) -> None:
        super().__init__()
        h, eps, bias = config.hidden_size, config.rms_norm_eps, config.attention_bias
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(
            config, layer_idx, qkv_bias=bias, o_bias=bias,
            rope_key="rotary_emb" if config.use_rope[layer_idx] else None)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, config.intermediate_size, act=config.hidden_act, bias=config.mlp_bias)


class SmolLM3ForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["SmolLM3DecoderLayer"]

    def __init__(self, config: SmolLM3Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, SmolLM3DecoderLayer, norm=norm))


register_family(ModelFamily(("smollm3",), read_smollm3, SmolLM3ForCausalLM))
