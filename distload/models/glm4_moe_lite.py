"""GLM-4.7-Flash (``glm4_moe_lite``): DeepSeek-V3's layers (`deepseek_v2.py`: multi-head
latent attention, RoPE on interleaved pairs of the `qk_rope_head_dim` channels, sigmoid
``noaux_tc`` routing with the learnt bias, shared + routed experts) with GLM's defaults
(one expert group) and `mlp_layer_types` naming each layer's MLP, ``"dense"`` or
``"sparse"`` (the first dense, the rest sparse by default)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .common.routing import ROUTER_FLOAT32
from .deepseek_v2 import DeepseekConfig, DeepseekForCausalLM, read_deepseek
from .registry import ModelFamily, register_family

__all__ = ["Glm4MoeLiteConfig", "read_glm4_moe_lite"]

# Glm4MoeLiteConfig's defaults (transformers 5) for keys a config.json may leave out.
_DEFAULTS = {"intermediate_size": 10240, "max_position_embeddings": 202752, "n_routed_experts": 64,
             "n_shared_experts": 1, "moe_intermediate_size": 1536, "kv_lora_rank": 512, "q_lora_rank": 768,
             "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "first_k_dense_replace": 0,
             "routed_scaling_factor": 1.8, "num_experts_per_tok": 4, "norm_topk_prob": True,
             "rms_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 1}


@dataclass(frozen=True, kw_only=True)
class Glm4MoeLiteConfig(DeepseekConfig):
    """A GLM-4.7-Flash decoder: `sparse_layers` marks the layers with experts. Example::

        cfg = read_glm4_moe_lite(json.load(open("GLM-4.7-Flash/config.json")))
        cfg.is_sparse(0), cfg.is_sparse(1)      # False, True
    """

    sparse_layers: tuple[bool, ...] = ()

    def is_sparse(self, layer_idx: int) -> bool:
        return self.sparse_layers[layer_idx]


def read_glm4_moe_lite(d: dict[str, Any]) -> Glm4MoeLiteConfig:
    """The `Glm4MoeLiteConfig` of a config.json dict; ValueError naming an unsupported field."""
    layers = d.get("num_hidden_layers")
    types = d.get("mlp_layer_types")
    if types is None and isinstance(layers, int):
        types = ["dense"] + ["sparse"] * (layers - 1)
    if not isinstance(types, list) or len(types) != layers or any(t not in ("dense", "sparse") for t in types):
        raise ValueError(f"mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} layers "
                         f"(num_hidden_layers), not {types!r}")
    interleave = d.get("rope_interleave")
    base = read_deepseek(
        {**d, "topk_method": "noaux_tc", "n_group": d.get("n_group") or 1, "topk_group": d.get("topk_group") or 1,
         # only whether any layer is sparse matters here: the routing is checked then
         "first_k_dense_replace": 0 if "sparse" in types else layers},
        defaults=_DEFAULTS, method="noaux_tc", rope_interleave=True if interleave is None else interleave,
        rope_complex=False)
    return Glm4MoeLiteConfig(**{f.name: getattr(base, f.name) for f in fields(base)},
                             sparse_layers=tuple(t == "sparse" for t in types))


register_family(ModelFamily(("glm4_moe_lite",), read_glm4_moe_lite, DeepseekForCausalLM,
                            unread=("num_key_value_heads", "head_dim"), keep_float32=ROUTER_FLOAT32))
