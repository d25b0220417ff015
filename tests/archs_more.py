"""Tiny random checkpoints of the frontier-era architectures (gpt-oss, GLM-4.5, Llama 4,
OLMoE, OLMo 3, ERNIE 4.5, EXAONE 4, Seed-OSS, Command A, Ministral 3, Qwen3-Next, Qwen3.5,
GPT-NeoX, Phi),
written by transformers itself with the machinery of `tests/archs.py` (each type's own
config class, `from_config`, every parameter perturbed, `save_pretrained` in >= 2 shards),
with awkward sizes: odd intermediate sizes, GQA, head_dim != hidden / heads where the type
allows, windows and chunks shorter than the prompts, NoPE layers, clamps and scales that
change the logits. `PACKED` lists the MoE types whose hub layout is one tensor per expert
and which also get the packed layout (`tests.archs.repack_experts`).
"""

from __future__ import annotations

from tests.archs import _BASE

_SLIDING4 = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]

MORE: dict[str, dict] = {
    # swiglu_limit small enough that the clamps cut; sinks and biases perturbed like all weights.
    "gpt_oss": {"model_type": "gpt_oss", "head_dim": 24, "num_local_experts": 5,
                "num_experts_per_tok": 2, "sliding_window": 4, "swiglu_limit": 0.3,
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                    "original_max_position_embeddings": 64}},
    # 2 groups of 3 experts, 1 group chosen: the group limit decides some tokens' experts.
    "glm4_moe": {"model_type": "glm4_moe", "head_dim": 24, "n_routed_experts": 6,
                 "num_experts_per_tok": 2, "moe_intermediate_size": 23, "n_shared_experts": 2,
                 "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "use_qk_norm": True,
                 "routed_scaling_factor": 2.5, "attention_bias": True},
    # chunks of 4 on the RoPE layers, a NoPE full layer every 2nd, temperature tuning with a
    # floor of 4 (so it changes within the prompt), MoE every 2nd layer with 2 of 4 experts.
    "llama4_text": {"model_type": "llama4_text", "head_dim": 24, "num_local_experts": 4,
                    "num_experts_per_tok": 2, "intermediate_size_mlp": 91,
                    "interleave_moe_layer_step": 2, "attention_chunk_size": 4,
                    "no_rope_layer_interval": 2, "floor_scale": 4, "attn_scale": 0.5,
                    "use_qk_norm": True},
    "olmoe": {"model_type": "olmoe", "num_experts": 5, "num_experts_per_tok": 2, "clip_qkv": 1.5,
              "norm_topk_prob": True},
    "olmo3": {"model_type": "olmo3", "head_dim": 24, "sliding_window": 4, "layer_types": _SLIDING4,
              "rope_parameters": {
                  "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "ernie4_5": {"model_type": "ernie4_5", "head_dim": 24, "use_bias": True, "tie_word_embeddings": False},
    "exaone4": {"model_type": "exaone4", "head_dim": 24, "sliding_window": 4, "sliding_window_pattern": 3},
    "seed_oss": {"model_type": "seed_oss", "head_dim": 24, "attention_bias": True,
                 "attention_out_bias": True, "mlp_bias": True},
    "cohere2": {"model_type": "cohere2", "head_dim": 24, "sliding_window": 4, "layer_types": _SLIDING4,
                "logit_scale": 0.5},
    # original_max_position_embeddings 4: the long-context query scale grows within the prompt.
    "ministral3": {"model_type": "ministral3", "head_dim": 24, "sliding_window": 5, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 4,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.3}},
    "gpt_neox": {"model_type": "gpt_neox", "num_key_value_heads": None, "use_parallel_residual": True,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                     "partial_rotary_factor": 0.25}},
    "gpt_neox_serial": {"model_type": "gpt_neox", "num_key_value_heads": None,
                        "use_parallel_residual": False, "hidden_act": "gelu_new",
                        "tie_word_embeddings": True},
    # linear attention first (its state counts the tokens), a gated full layer, MoE with a
    # gated shared expert; 2 key heads feed 4 value heads.
    "qwen3_next": {"model_type": "qwen3_next", "head_dim": 24, "layer_types": [
        "linear_attention", "full_attention", "linear_attention", "linear_attention"],
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 12, "linear_conv_kernel_dim": 3, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 23, "shared_expert_intermediate_size": 31,
        "mlp_only_layers": [2]},
    "qwen3_5_text": {"model_type": "qwen3_5_text", "head_dim": 24, "layer_types": [
        "linear_attention", "linear_attention", "full_attention", "linear_attention"],
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 12, "linear_conv_kernel_dim": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 2, 2], "mrope_interleaved": True}},
    "phi": {"model_type": "phi", "num_key_value_heads": 2, "qk_layernorm": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "partial_rotary_factor": 0.5}},
}
# The hub's multimodal checkpoints of which distload loads the text model (`text_config`,
# weights under a language-model prefix): a tiny vision tower beside one case above.
MORE["llama4"] = {"model_type": "llama4", "text": "llama4_text"}
MORE["qwen3_5"] = {"model_type": "qwen3_5", "text": "qwen3_5_text"}
NESTED = ("llama4", "qwen3_5")
PACKED = ("glm4_moe", "olmoe")
MOE = ("gpt_oss", "glm4_moe", "llama4_text", "olmoe", "qwen3_next", "llama4")


def more_config(name: str):
    """transformers' own config object of case `name`."""
    import transformers
    from transformers import AutoConfig

    if name in NESTED:
        text = more_config(MORE[name]["text"]).to_dict()
        if name == "llama4":
            vision = transformers.Llama4VisionConfig(
                hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                image_size=28, patch_size=14, vision_output_dim=16, projector_input_dim=16,
                projector_output_dim=_BASE["hidden_size"], pixel_shuffle_ratio=0.5)
            return transformers.Llama4Config(text_config=text, vision_config=vision.to_dict(),
                                             image_token_index=125, boi_token_index=126, eoi_token_index=127)
        vision = transformers.Qwen3_5VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                                  out_hidden_size=_BASE["hidden_size"])
        return transformers.Qwen3_5Config(text_config=text, vision_config=vision.to_dict(), image_token_id=125,
                                          video_token_id=124, vision_start_token_id=126, vision_end_token_id=127)
    kw = {k: v for k, v in {**_BASE, **MORE[name]}.items() if v is not None}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)
