"""Qwen3.5-MoE's text model (qwen3_5_moe_text, and the text part of the hub's multimodal
qwen3_5_moe checkpoints): Qwen3.5's hybrid decoder (unfused gated-DeltaNet projections,
gated full attention) with Qwen3-Next's sparse MLP in every layer — softmax top-k,
always renormalized, plus a sigmoid-gated shared expert."""

from __future__ import annotations

from typing import Any

from .common.config import text_config
from .qwen3_next import Qwen3NextConfig, Qwen3NextForCausalLM, read_qwen3_next
from .registry import ModelFamily, register_family

__all__ = ["read_qwen3_5_moe_text", "read_qwen3_5_moe"]

# Qwen3_5MoeTextConfig's defaults (transformers 5) for keys a config.json may leave out;
# it has no dense MLP, so `intermediate_size` is never read (the value only fills the field).
_DEFAULTS = {"intermediate_size": 512, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "head_dim": 256, "num_key_value_heads": 2}
# what the type fixes, whatever config.json holds
_FIXED = {"intermediate_size": None, "norm_topk_prob": True, "decoder_sparse_step": 1,
          "mlp_only_layers": []}


def _read(d: dict[str, Any], nested_in: str | None = None) -> Qwen3NextConfig:
    experts = d.get("num_experts", 256)
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ValueError(f"num_experts must be a positive integer, not {experts!r}")
    return read_qwen3_next({"num_experts_per_tok": 8, **d, **_FIXED, "num_experts": experts},
                           defaults=_DEFAULTS, fused_linear_projections=False, nested_in=nested_in)


def read_qwen3_5_moe_text(d: dict[str, Any]) -> Qwen3NextConfig:
    """The config of a qwen3_5_moe_text config.json dict (a `Qwen3NextConfig` whose every
    layer is sparse); ValueError naming an unsupported field.

    Example::

        cfg = read_qwen3_5_moe_text(json.load(open("config.json"))["text_config"])
        cfg.is_sparse(0), cfg.num_experts        # True, 256
    """
    return _read(d)


def read_qwen3_5_moe(d: dict[str, Any]) -> Qwen3NextConfig:
    """The text model of a Qwen3.5-MoE multimodal config.json (``model_type: qwen3_5_moe``),
    whose weights sit under ``model.language_model.``; the vision tower is not read."""
    text = text_config(d, "qwen3_5_moe", "qwen3_5_moe_text", unread=("intermediate_size", "mlp_only_layers", "decoder_sparse_step"))
    return _read(text, nested_in="qwen3_5_moe")


_UNREAD = ("intermediate_size", "norm_topk_prob", "mlp_only_layers", "decoder_sparse_step")
register_family(ModelFamily(("qwen3_5_moe_text",), read_qwen3_5_moe_text, Qwen3NextForCausalLM, unread=_UNREAD))
register_family(ModelFamily(("qwen3_5_moe",), read_qwen3_5_moe, Qwen3NextForCausalLM, nested_text=True,
                            unread=_UNREAD))
