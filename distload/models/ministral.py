"""Ministral (8B, 2410) and CWM (Code World Model): Mistral's bias-free attention whose
sliding window applies to the layers `layer_types` marks ``"sliding_attention"`` —
Ministral: all of them by default, while `sliding_window` is set; CWM: three of every four
(every fourth from layer 0 global), with llama3-scaled RoPE by default and an optional
MLP bias (`mlp_bias`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common.config import FULL, SLIDING, DecoderConfig, positive_int, read_decoder, read_layer_types
from .common.decoder import DecoderForCausalLM, DecoderModel
from .common.layers import RMSNorm, activation
from .llama import LlamaDecoderLayer
from .registry import ModelFamily, register_family

__all__ = ["MinistralConfig", "MinistralForCausalLM", "read_ministral"]

# MinistralConfig's and CwmConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {
    "ministral": {"intermediate_size": 14336, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6,
                  "num_key_value_heads": 8, "sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2},
    "cwm": {"intermediate_size": 21504, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "num_key_value_heads": 8, "head_dim": 128, "sliding_window": 8192, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009]},
}
_CWM_ROPE = {"rope_type": "llama3", "rope_theta": 1_000_000.0, "factor": 16.0, "high_freq_factor": 4.0,
             "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True, kw_only=True)
class MinistralConfig(DecoderConfig):
    """A Ministral or CWM decoder: no attention biases. Example::

        cfg = read_ministral(json.load(open("Ministral-8B-Instruct-2410/config.json")))
        cfg.layer_sliding_window(0)      # 32768
    """

    mlp_bias: bool = False
    # what LlamaDecoderLayer asks of its config
    attention_bias: bool = False
    o_proj_bias: bool = False


def read_ministral(d: dict[str, Any]) -> MinistralConfig:
    """The `MinistralConfig` of a ministral or cwm config.json dict; ValueError naming an
    unsupported field."""
    model_type = d["model_type"]
    defaults = _DEFAULTS[model_type]
    if model_type == "cwm" and not d.get("rope_parameters") and not d.get("rope_scaling"):
        d = {**d, "rope_parameters": dict(_CWM_ROPE)}
    fields = read_decoder(d, defaults=defaults)
    activation(fields["hidden_act"])
    raw = d.get("sliding_window", defaults["sliding_window"])
    window = positive_int(d, "sliding_window", defaults["sliding_window"]) if raw else None
    layers = fields["num_hidden_layers"]
    if model_type == "cwm":
        default_types = [FULL if i % 4 == 0 else SLIDING for i in range(layers)]
    else:
        default_types = [SLIDING if window is not None else FULL] * layers
    if d.get("mlp_bias") is not None and not isinstance(d["mlp_bias"], bool):
        raise ValueError(f"mlp_bias must be true or false, not {d['mlp_bias']!r}")
    return MinistralConfig(**fields, sliding_window=window, layer_types=read_layer_types(d, layers, default_types),
                           mlp_bias=model_type == "cwm" and bool(d.get("mlp_bias", False)))


class MinistralForCausalLM(DecoderForCausalLM):
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: MinistralConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, LlamaDecoderLayer, norm=norm))


register_family(ModelFamily(("ministral", "cwm"), read_ministral, MinistralForCausalLM))
