"""Built-in architectures: the Llama family (llama, mistral, qwen2), written to be split
into pipeline stages on the meta device. Knows nothing of checkpoints or ranks.

Example::

    cfg = config_from_dict(json.load(open("ckpt/config.json")))
    with torch.device("meta"):
        model = build_model(cfg)      # no memory; materialize only what a rank keeps
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .cache import KVCache
from .config import SUPPORTED_MODEL_TYPES, LlamaConfig
from .llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

__all__ = [
    "SUPPORTED_MODEL_TYPES", "LlamaConfig", "LlamaForCausalLM", "LlamaModel",
    "LlamaDecoderLayer", "KVCache", "config_from_dict", "build_model",
]


def config_from_dict(d: dict[str, Any]) -> LlamaConfig:
    """The model config of a Hugging Face `config.json` dict; ValueError names an
    unsupported `model_type` and lists the supported ones.

    Example::

        config_from_dict({"model_type": "gpt2"})  # ValueError: ... supports llama, mistral, qwen2
    """
    return LlamaConfig.from_dict(d)


def build_model(config: LlamaConfig | dict[str, Any]) -> nn.Module:
    """Construct (not load) the model for `config`, on whatever device context is active
    (`torch.device("meta")`, `distload.init_empty_weights()`, ...).

    Example::

        with init_empty_weights():
            model = build_model(json.load(open("ckpt/config.json")))
        model.model.layers["0"]        # LlamaDecoderLayer, parameters on meta
    """
    if not isinstance(config, LlamaConfig):
        config = config_from_dict(config)
    return LlamaForCausalLM(config)
