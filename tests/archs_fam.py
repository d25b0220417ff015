"""Tiny random checkpoints of the further decoder families (Ministral, CWM, OLMo, Helium,
Arcee, GLM, InternLM 3, IQuest-Coder, EXAONE 3, Apertus, HunYuan dense and MoE, StableLM,
Persimmon, Nemotron, Jais 2, VaultGemma, Qwen3.5-MoE, ERNIE 4.5 MoE, GLM-4.7-Flash,
dots.llm1, K-EXAONE, Granite MoE, MiniMax-M2, Phi-3.5-MoE, Command A MoE, GPT-J, CodeGen, GPT-2, GPTBigCode, OPT, BLOOM, Falcon, GPT-Neo, Solar Open,
HyperCLOVA X, FlexOlmo, Youtu, BitNet), written by
transformers itself with the machinery of `tests/archs.py` (each type's own config class,
`from_config`, every parameter perturbed, `save_pretrained` in >= 2 shards), with awkward
sizes: odd intermediate sizes, GQA, head_dim != hidden / heads where the type allows, windows shorter
than the prompts, clamps, biases everywhere a switch allows them. `THREE` also run on 3
ranks; `PACKED` also get the packed expert layout.
"""

from __future__ import annotations

from tests.archs import _BASE

_SLIDING4 = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]

FAM: dict[str, dict] = {
    "ministral": {"model_type": "ministral", "head_dim": 24, "sliding_window": 4, "layer_types": _SLIDING4},
    "cwm": {"model_type": "cwm", "head_dim": 24, "sliding_window": 3, "mlp_bias": True},
    # OlmoConfig has no head_dim: hidden / heads
    "olmo": {"model_type": "olmo", "clip_qkv": 0.5, "attention_bias": True, "tie_word_embeddings": True},
    # o_proj is hidden x hidden: head_dim = hidden / heads
    "helium": {"model_type": "helium", "head_dim": 16, "attention_bias": True, "mlp_bias": True},
    "arcee": {"model_type": "arcee", "head_dim": 24, "attention_bias": True, "mlp_bias": True,
              "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                  "original_max_position_embeddings": 64}},
    "glm": {"model_type": "glm", "head_dim": 24, "tie_word_embeddings": True},
    "internlm3": {"model_type": "internlm3", "head_dim": 24, "attention_bias": True, "mlp_bias": True},
    "iquestcoder": {"model_type": "iquestcoder", "head_dim": 24, "mlp_bias": True},
    "exaone": {"model_type": "exaone", "head_dim": 24, "tie_word_embeddings": True},
    "apertus": {"model_type": "apertus", "attention_bias": True},
    "hunyuan_v1_dense": {"model_type": "hunyuan_v1_dense", "head_dim": 24, "attention_bias": True},
    "hunyuan_v1_moe": {"model_type": "hunyuan_v1_moe", "head_dim": 24, "num_experts": 5, "moe_topk": 2,
                       "intermediate_size": 23},
    "stablelm": {"model_type": "stablelm", "use_qkv_bias": True, "qk_layernorm": True,
                 "use_parallel_residual": True},
    "stablelm_serial": {"model_type": "stablelm", "use_parallel_residual": False, "tie_word_embeddings": True},
    "persimmon": {"model_type": "persimmon", "num_key_value_heads": None, "qk_layernorm": True},
    "nemotron": {"model_type": "nemotron", "head_dim": 24, "attention_bias": True, "mlp_bias": True},
    "jais2": {"model_type": "jais2", "head_dim": 24},
    # RoPE on interleaved pairs of the first 8 channels of 16
    "gptj": {"model_type": "gptj", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 256, "rotary_dim": 8,
             "n_inner": 87, "hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None,
             "num_key_value_heads": None, "max_position_embeddings": None, "intermediate_size": None},
    # 8 heads in 4 blocks of the fused qkv_proj, RoPE on 8 of 16 channels
    "codegen": {"model_type": "codegen", "n_embd": 128, "n_layer": 4, "n_head": 8, "n_positions": 256,
                "rotary_dim": 8, "n_inner": 87, "hidden_size": None, "num_hidden_layers": None,
                "num_attention_heads": None, "num_key_value_heads": None, "max_position_embeddings": None,
                "intermediate_size": None},
    # learned absolute positions (a table of 64: prompt and new tokens fit), Conv1D weights, tied head
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 64, "n_inner": 87,
             "hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None,
             "num_key_value_heads": None, "max_position_embeddings": None, "intermediate_size": None},
    # each layer's scores also scaled by 1 / (layer + 1), an untied head, the default 4x MLP
    "gpt2_scaled": {"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 2, "n_positions": 40,
                    "scale_attn_by_inverse_layer_idx": True, "tie_word_embeddings": False,
                    "activation_function": "gelu", "hidden_size": None, "num_hidden_layers": None,
                    "num_attention_heads": None, "num_key_value_heads": None, "max_position_embeddings": None,
                    "intermediate_size": None},
    # GPT-2's layout with Linears: one key/value head (multi_query), or per-head fused q/k/v
    "gpt_bigcode": {"model_type": "gpt_bigcode", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 64,
                    "n_inner": 87, "hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None,
                    "num_key_value_heads": None, "max_position_embeddings": None, "intermediate_size": None},
    "gpt_bigcode_mha": {"model_type": "gpt_bigcode", "multi_query": False, "n_embd": 64, "n_layer": 4, "n_head": 4,
                        "n_positions": 64, "tie_word_embeddings": False, "hidden_size": None,
                        "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None,
                        "max_position_embeddings": None, "intermediate_size": None},
    # ALiBi (6 heads: 4 slopes of the series for 4, then 2 from the series for 8), an
    # embedding layer norm, per-head fused q/k/v; then the post-layernorm residual variant
    "bloom": {"model_type": "bloom", "n_layer": 4, "n_head": 6, "hidden_size": 72, "num_hidden_layers": None,
              "num_attention_heads": None, "num_key_value_heads": None, "intermediate_size": None,
              "max_position_embeddings": None},
    "bloom_post": {"model_type": "bloom", "n_layer": 4, "n_head": 4, "apply_residual_connection_post_layernorm": True,
                   "tie_word_embeddings": False, "num_hidden_layers": None, "num_attention_heads": None,
                   "num_key_value_heads": None, "intermediate_size": None, "max_position_embeddings": None},
    # Falcon-7B's layout (one key/value head, parallel attention and MLP on one norm)
    "falcon": {"model_type": "falcon", "num_key_value_heads": None, "intermediate_size": None, "ffn_hidden_size": 87},
    # 40B/180B's: grouped q/k/v (2 groups of 2 query heads), two norms, biases
    "falcon_new": {"model_type": "falcon", "new_decoder_architecture": True, "num_kv_heads": 2, "bias": True,
                   "num_key_value_heads": None, "intermediate_size": None, "tie_word_embeddings": False},
    # the old layout with all heads interleaved per head, attention then MLP in series
    "falcon_serial": {"model_type": "falcon", "multi_query": False, "parallel_attn": False, "bias": True,
                      "num_key_value_heads": None, "intermediate_size": None},
    # GPT-2's skeleton with unscaled scores and a local layer (window 4 < the prompts) after each global one
    "gpt_neo": {"model_type": "gpt_neo", "num_layers": 4, "num_heads": 4, "window_size": 4,
                "attention_types": [[["global", "local"], 2]], "max_position_embeddings": 64,
                "num_hidden_layers": None, "num_attention_heads": None, "num_key_value_heads": None},
    # learned positions 2 rows in, pre-norm with a final norm, biases, ReLU, tied head
    "opt": {"model_type": "opt", "ffn_dim": 87, "max_position_embeddings": 40, "intermediate_size": None,
            "num_key_value_heads": None},
    # OPT-350M's shape: post-norm layers, no final norm, 32-wide embeddings projected in and out
    "opt_post": {"model_type": "opt", "ffn_dim": 87, "max_position_embeddings": 40, "do_layer_norm_before": False,
                 "word_embed_proj_dim": 32, "intermediate_size": None, "num_key_value_heads": None},
    # MLA (query low-rank path, interleaved decoupled RoPE) with dense MLPs, tied head (the pad
    # token's row zeroed, as transformers loads it)
    "youtu": {"model_type": "youtu", "num_key_value_heads": 4, "q_lora_rank": 22, "kv_lora_rank": 20,
              "qk_nope_head_dim": 10, "qk_rope_head_dim": 6, "v_head_dim": 12},
    "bitnet": {"model_type": "bitnet", "attention_bias": True},
    "hyperclovax": {"model_type": "hyperclovax", "head_dim": 24, "embedding_multiplier": 2.0, "residual_multiplier": 0.7,
                    "logits_scaling": 0.5, "attention_bias": True, "mlp_bias": True},
    "vaultgemma": {"model_type": "vaultgemma", "head_dim": 24, "query_pre_attn_scalar": 20, "sliding_window": 4,
                   "final_logit_softcapping": 2.0, "attn_logit_softcapping": 1.0},
    # linear attention first, a gated full layer; every layer sparse with a gated shared expert
    "qwen3_5_moe_text": {"model_type": "qwen3_5_moe_text", "head_dim": 24, "layer_types": [
        "linear_attention", "full_attention", "linear_attention", "linear_attention"],
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 12, "linear_conv_kernel_dim": 3, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 23, "shared_expert_intermediate_size": 31, "intermediate_size": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                            "mrope_section": [2, 2, 2], "mrope_interleaved": True}},
    # MoE from layer 1, 2 shared experts fused, biases on attention, dense and shared MLPs
    "ernie4_5_moe": {"model_type": "ernie4_5_moe", "moe_num_experts": 5, "moe_k": 2,
                     "moe_intermediate_size": 23, "moe_num_shared_experts": 2, "use_bias": True,
                     "tie_word_embeddings": False},
    # MLA with a query low-rank path, 2 groups of 3 experts (1 kept), dense and sparse layers alternating
    "glm4_moe_lite": {"model_type": "glm4_moe_lite", "num_key_value_heads": 4, "q_lora_rank": 22, "kv_lora_rank": 20,
                      "qk_nope_head_dim": 10, "qk_rope_head_dim": 6, "v_head_dim": 12, "moe_intermediate_size": 23,
                      "n_routed_experts": 6, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                      "n_shared_experts": 1, "routed_scaling_factor": 2.5,
                      "mlp_layer_types": ["dense", "sparse", "dense", "sparse"]},
    # Qwen3 attention with a window from layer 2, 1 dense layer then 2 groups of 3 experts (1 kept)
    "flex_olmo": {"model_type": "flex_olmo", "num_experts": 5, "num_experts_per_tok": 2, "intermediate_size": 23,
                  "norm_topk_prob": True, "attention_bias": True},
    # every layer sparse: 2 groups of 3 experts (1 kept), full RoPE, q/k/v biases
    "solar_open": {"model_type": "solar_open", "head_dim": 24, "n_routed_experts": 6, "num_experts_per_tok": 2,
                   "n_group": 2, "topk_group": 1, "n_shared_experts": 1, "moe_intermediate_size": 23,
                   "routed_scaling_factor": 2.5, "attention_bias": True, "intermediate_size": None},
    "dots1": {"model_type": "dots1", "sliding_window": 4, "max_window_layers": 2,
              "first_k_dense_replace": 1, "n_routed_experts": 6, "num_experts_per_tok": 2, "n_group": 2,
              "topk_group": 1, "n_shared_experts": 2, "moe_intermediate_size": 23, "norm_topk_prob": True,
              "routed_scaling_factor": 2.5, "attention_bias": True},
    # sliding layers with RoPE, a global NoPE one; dense, sparse, sparse, dense
    "exaone_moe": {"model_type": "exaone_moe", "sliding_window": 4, "sliding_window_pattern": 3,
                   "mlp_layer_types": ["dense", "sparse", "sparse", "dense"], "num_experts": 6,
                   "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "moe_intermediate_size": 23,
                   "num_shared_experts": 1, "routed_scaling_factor": 2.5},
    "granitemoe": {"model_type": "granitemoe", "num_local_experts": 5, "num_experts_per_tok": 2,
                   "intermediate_size": 23, "embedding_multiplier": 3.0, "attention_multiplier": 0.3,
                   "residual_multiplier": 0.5, "logits_scaling": 4.0, "attention_bias": True},
    "granitemoeshared": {"model_type": "granitemoeshared", "num_local_experts": 4,
                         "num_experts_per_tok": 2, "intermediate_size": 23, "shared_intermediate_size": 31,
                         "embedding_multiplier": 2.0, "residual_multiplier": 0.7, "logits_scaling": 2.0,
                         "tie_word_embeddings": True},
    # full-width q/k norms, RoPE on half of each head (the released configs' rotary_dim), sigmoid routing
    "minimax_m2": {"model_type": "minimax_m2", "head_dim": 24, "rotary_dim": 12, "num_local_experts": 5,
                   "num_experts_per_tok": 2, "intermediate_size": 23},
    # SparseMixer with a wide jitter band (several experts share each softmax), a window on every layer
    "phimoe": {"model_type": "phimoe", "num_local_experts": 5, "intermediate_size": 23,
               "router_jitter_noise": 0.3, "attention_bias": True, "lm_head_bias": True, "sliding_window": 5},
    # longrope: the short factors, cos/sin scaled by short_mscale (a batch whose positions pass the
    # pretraining length switches to long_mscale per call in transformers, per micro-batch here: not compared)
    "phimoe_longrope": {"model_type": "phimoe", "num_local_experts": 4, "intermediate_size": 23, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0] * 8, "short_mscale": 1.1, "long_mscale": 1.3, "original_max_position_embeddings": 64}},
    # a dense global first layer (RoPE forced), sliding sparse layers, a global sparse one without RoPE
    "cohere2_moe": {"model_type": "cohere2_moe", "head_dim": 24, "sliding_window": 4, "logit_scale": 0.5,
                    "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
                    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"], "num_experts": 5,
                    "num_experts_per_tok": 2, "num_shared_experts": 1, "intermediate_size": 23,
                    "prefix_dense_intermediate_size": 41},
    "cohere2_moe_rms": {"model_type": "cohere2_moe", "head_dim": 24, "rms_norm_eps": 1e-6,
                        "expert_selection_fn": "sigmoid", "shared_expert_combination_strategy": "sum",
                        "num_experts": 4, "num_experts_per_tok": 2, "num_shared_experts": 2, "intermediate_size": 23,
                        "tie_word_embeddings": False},
}
# The hub's multimodal checkpoint of which distload loads the text model (`text_config`,
# weights under a language-model prefix): a tiny vision tower beside the case named.
FAM["qwen3_5_moe"] = {"model_type": "qwen3_5_moe", "text": "qwen3_5_moe_text"}
NESTED = ("qwen3_5_moe",)
MOE = ("hunyuan_v1_moe", "qwen3_5_moe_text", "qwen3_5_moe", "ernie4_5_moe", "glm4_moe_lite", "dots1", "exaone_moe",
       "granitemoe", "granitemoeshared", "minimax_m2", "phimoe", "phimoe_longrope",
       "cohere2_moe", "cohere2_moe_rms", "solar_open", "flex_olmo")
PACKED = ("hunyuan_v1_moe", "qwen3_5_moe_text")
THREE = ("ministral", "apertus", "hunyuan_v1_moe", "stablelm", "qwen3_5_moe_text", "gpt2", "opt_post")


def fam_config(name: str):
    """transformers' own config object of case `name`."""
    import transformers
    from transformers import AutoConfig

    if name in NESTED:
        text = fam_config(FAM[name]["text"]).to_dict()
        vision = transformers.Qwen3_5MoeVisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                                     out_hidden_size=_BASE["hidden_size"])
        return transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision.to_dict(), image_token_id=125,
                                             video_token_id=124, vision_start_token_id=126,
                                             vision_end_token_id=127)
    kw = {k: v for k, v in {**_BASE, **FAM[name]}.items() if v is not None}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)
