"""Youtu-LLM: DeepSeek-V3's multi-head latent attention (`deepseek_v2.py`: compressed KV,
decoupled RoPE on interleaved pairs, the cache holding the latent) with a dense SwiGLU MLP
in every layer — no experts — and tied embeddings by default.

transformers' Youtu zeroes the embedding row of `pad_token_id` when it loads a checkpoint
(its `_init_weights` writes through ``weight.data[padding_idx]``, which the loaded-weights
guard does not see), and with it the tied head's row: the pad token embeds to zeros and,
tied, scores 0. The model here does the same at run time, leaving the weights as stored.
"""

from __future__ import annotations

from typing import Any

import torch

from .common.decoder import DecoderForCausalLM, DecoderModel
from .common.layers import RMSNorm
from .deepseek_v2 import DeepseekConfig, DeepseekDecoderLayer, DeepseekForCausalLM, read_deepseek
from .registry import ModelFamily, register_family

__all__ = ["read_youtu", "YoutuForCausalLM"]

# YoutuConfig's defaults (transformers 5: DeepSeek-V3's attention sizes) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 6144, "max_position_embeddings": 131072, "kv_lora_rank": 512, "q_lora_rank": 1536,
             "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "tie_word_embeddings": True,
             "bos_token_id": 128000, "eos_token_id": 128001,
             # no experts: these only fill the fields
             "n_routed_experts": 1, "n_shared_experts": 0, "moe_intermediate_size": 1, "num_experts_per_tok": 1,
             "first_k_dense_replace": 0, "routed_scaling_factor": 1.0}
_NO_EXPERTS = ("n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok",
               "first_k_dense_replace", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob",
               "topk_method")


def read_youtu(d: dict[str, Any]) -> DeepseekConfig:
    """The `DeepseekConfig` of a youtu config.json dict, every layer dense; ValueError naming
    an unsupported field."""
    interleave = d.get("rope_interleave")
    dense = {k: v for k, v in d.items() if k not in _NO_EXPERTS}
    layers = d.get("num_hidden_layers")
    return read_deepseek({**dense, "first_k_dense_replace": layers if isinstance(layers, int) else 0,
                          "topk_method": "greedy"}, defaults=_DEFAULTS, method="greedy",
                         rope_interleave=True if interleave is None else interleave, rope_complex=False)


class YoutuModel(DecoderModel):
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        pad = self.config.pad_token_id
        return h if pad is None else h.masked_fill((ids == pad)[..., None], 0.0)


class YoutuForCausalLM(DeepseekForCausalLM):
    def __init__(self, config: DeepseekConfig) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        DecoderForCausalLM.__init__(
            self, config, YoutuModel(config, DeepseekDecoderLayer, norm=norm, interleaved_rope=config.rope_interleave))

    def final_logits(self, logits: torch.Tensor) -> torch.Tensor:
        pad = self.config.pad_token_id
        if pad is None or not self.config.tie_word_embeddings:
            return logits
        return logits.index_fill(-1, torch.tensor([pad], device=logits.device), 0.0)


register_family(ModelFamily(("youtu",), read_youtu, YoutuForCausalLM,
                            unread=("num_key_value_heads", "head_dim") + _NO_EXPERTS))
