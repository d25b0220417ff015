"""Qwen3.5's text model (qwen3_5_text, and the text part of the hub's multimodal qwen3_5
checkpoints): Qwen3-Next's hybrid decoder — gated-DeltaNet
linear attention and gated full attention, three to one — with dense SwiGLU MLPs and
the linear layers' projections unfused (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``,
``in_proj_a``). Its multimodal RoPE (`mrope_section`) gives every channel the same
position for text, which is plain partial RoPE."""

from __future__ import annotations

from typing import Any

from .common.config import text_config
from .qwen3_next import Qwen3NextConfig, Qwen3NextForCausalLM, read_qwen3_next
from .registry import ModelFamily, register_family

__all__ = ["read_qwen3_5_text", "read_qwen3_5"]

# Qwen3_5TextConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 12288, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "head_dim": 256, "num_key_value_heads": 4}


def read_qwen3_5_text(d: dict[str, Any]) -> Qwen3NextConfig:
    """The config of a qwen3_5_text config.json dict (a `Qwen3NextConfig` without experts);
    ValueError naming an unsupported field.

    Example::

        cfg = read_qwen3_5_text(json.load(open("config.json"))["text_config"])
        cfg.is_sparse(0), cfg.fused_linear_projections       # False, False
    """
    return read_qwen3_next({**d, "num_experts": 0}, defaults=_DEFAULTS, fused_linear_projections=False)


def read_qwen3_5(d: dict[str, Any]) -> Qwen3NextConfig:
    """The text model of a Qwen3.5 multimodal config.json (``model_type: qwen3_5``, the hub's
    checkpoints), whose weights sit under ``model.language_model.``; the vision tower is not
    read."""
    text = text_config(d, "qwen3_5", "qwen3_5_text")
    return read_qwen3_next({**text, "num_experts": 0}, defaults=_DEFAULTS, fused_linear_projections=False,
                           nested_in="qwen3_5")


register_family(ModelFamily(("qwen3_5_text",), read_qwen3_5_text, Qwen3NextForCausalLM))
register_family(ModelFamily(("qwen3_5",), read_qwen3_5, Qwen3NextForCausalLM, nested_text=True))
