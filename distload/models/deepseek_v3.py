"""DeepSeek-V3 (and R1, Kimi K2, the models of its architecture): DeepSeek-V2's layers
(`deepseek_v2.py`: multi-head latent attention, dense first layers, shared + routed
experts) with V3's routing — sigmoid scores, the learnt `e_score_correction_bias` added to
choose (``noaux_tc``), groups ranked by their two best experts, the unbiased weights
renormalized (`norm_topk_prob`) and scaled by `routed_scaling_factor` — and RoPE on
interleaved channel pairs (`rope_interleave`, default) or halves.

The hub's checkpoints append multi-token-prediction layers (``model.layers.61``) that the
model does not run; they are not read. FP8 checkpoints (``quantization_config``
``quant_method: fp8``) are decoded on load by `distload.checkpoint.quant`: this file never
sees the format.

Example::

    cfg = read_deepseek_v3(json.load(open("DeepSeek-V3/config.json")))
    cfg.n_routed_experts, cfg.topk_method, cfg.first_k_dense_replace   # 256, 'noaux_tc', 3
"""

from __future__ import annotations

from typing import Any

from .deepseek_v2 import DeepseekConfig, DeepseekForCausalLM, read_deepseek
from .common.routing import ROUTER_FLOAT32
from .registry import ModelFamily, register_family

__all__ = ["read_deepseek_v3"]

# transformers 5's DeepseekV3Config defaults for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 18432, "max_position_embeddings": 4096, "n_routed_experts": 256,
             "n_shared_experts": 1, "moe_intermediate_size": 2048, "kv_lora_rank": 512,
             "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
             "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8,
             "norm_topk_prob": True, "bos_token_id": 0, "eos_token_id": 1}


def read_deepseek_v3(d: dict[str, Any]) -> DeepseekConfig:
    """The `DeepseekConfig` of a deepseek_v3 config.json dict; ValueError naming a field.
    V3 always routes ``noaux_tc`` (transformers reads no `topk_method`), over `n_group`
    groups (default 8, keeping `topk_group` 4)."""
    interleave = d.get("rope_interleave")
    d = {**d, "topk_method": "noaux_tc",
         "n_group": d.get("n_group") if d.get("n_group") is not None else 8,
         "topk_group": d.get("topk_group") if d.get("topk_group") is not None else 4}
    return read_deepseek(d, defaults=_DEFAULTS, method="noaux_tc",
                         rope_interleave=True if interleave is None else interleave, rope_complex=False)


register_family(ModelFamily(("deepseek_v3",), read_deepseek_v3, DeepseekForCausalLM,
                            unread=("num_key_value_heads", "head_dim"), keep_float32=ROUTER_FLOAT32))
