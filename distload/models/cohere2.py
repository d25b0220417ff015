"""Command R7B / Command A (cohere2): Cohere's parallel block, ``x + attn(norm(x)) +
mlp(norm(x))`` with one bias-free layer norm, interleaved RoPE rotated in float32, and
`logit_scale` on the logits — with hybrid attention: sliding-window layers (`layer_types`,
three to one by default) that apply RoPE, and global layers that apply none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cohere import CohereDecoderLayer, CohereForCausalLM, read_cohere
from .common.config import FULL, SLIDING, positive_int, read_layer_types
from .common.decoder import DecoderForCausalLM, DecoderModel
from .common.layers import LayerNormNoBias
from .cohere import CohereConfig
from .registry import ModelFamily, register_family

__all__ = ["Cohere2Config", "Cohere2ForCausalLM", "Cohere2DecoderLayer", "read_cohere2"]

# Cohere2Config's defaults that differ from Cohere's (transformers 5).
_DEFAULTS = {"rope_theta": 10000.0}


@dataclass(frozen=True, kw_only=True)
class Cohere2Config(CohereConfig):
    """A Cohere 2 decoder. Example::

        cfg = read_cohere2(json.load(open("c4ai-command-r7b-12-2024/config.json")))
        cfg.layer_sliding_window(0), cfg.layer_sliding_window(3)      # 4096, None
    """


def read_cohere2(d: dict[str, Any]) -> Cohere2Config:
    """The `Cohere2Config` of a config.json dict; ValueError naming an unsupported field."""
    d = {**d, "rope_theta": d.get("rope_theta", _DEFAULTS["rope_theta"])}
    base = read_cohere({**d, "use_qk_norm": False})
    layers = base.num_hidden_layers
    pattern = positive_int(d, "sliding_window_pattern", 4)
    layer_types = read_layer_types(d, layers, [SLIDING if (i + 1) % pattern else FULL for i in range(layers)])
    window = d.get("sliding_window", 4096)
    window = None if window is None else positive_int(d, "sliding_window")
    fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
    return Cohere2Config(**fields | {"sliding_window": window, "layer_types": layer_types if window else None})


class Cohere2DecoderLayer(CohereDecoderLayer):
    """Cohere's parallel layer; RoPE on the sliding layers only."""

    def __init__(self, config: Cohere2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        if config.layer_sliding_window(layer_idx) is None:
            self.self_attn.rope_key = None


class Cohere2ForCausalLM(CohereForCausalLM):
    _no_split_modules = ["Cohere2DecoderLayer"]

    def __init__(self, config: Cohere2Config) -> None:
        norm = LayerNormNoBias(config.hidden_size, config.rms_norm_eps)
        DecoderForCausalLM.__init__(self, config, DecoderModel(config, Cohere2DecoderLayer, norm=norm,
                                                               interleaved_rope=True))


register_family(ModelFamily(("cohere2",), read_cohere2, Cohere2ForCausalLM))
