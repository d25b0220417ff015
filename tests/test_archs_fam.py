"""The further decoder families (`tests/archs_fam.py`) against transformers, with the
machinery of `test_archs.py`: checkpoints transformers writes (`save_pretrained`, >= 2
shards; the MoE also with packed experts), loaded across 2 ranks (all) and 3 ranks
(`THREE`), one torchrun launch per world size (`workers/arch_pipeline.py`): logits of a
left-padded batch within 1e-4 (float32) of `from_pretrained`'s, 12 greedy tokens
identical, the ranks' bytes summing to the checkpoint's. In one process: transformers'
own default config of each type builds, the KV reserve per layer, the
transforms the checks see, config errors naming the field.
"""

from __future__ import annotations

import pytest
import torch

from distload.meta import describe_model
from distload.models import build_model

from .arch_checks import (case_references, check_config_mutations, check_pipelines, check_transform_seen,
                          make_checkpoints, run_pipelines)
from .archs_fam import FAM, MOE, NESTED, PACKED, THREE, fam_config
from .test_config_defaults import UNRUNNABLE

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory: every case, and `<moe>_packed` for `PACKED`."""
    return make_checkpoints(tmp_path_factory.mktemp("archs_fam"), FAM, fam_config, PACKED)


@pytest.fixture(scope="module")
def references(checkpoints):
    """name -> (logits, greedy tokens) of transformers on the left-padded batch."""
    return case_references(checkpoints, FAM, moe=MOE, nested=NESTED)


@pytest.mark.parametrize("world", [2, 3])
def test_families_across_ranks_match_transformers(world, checkpoints, references, tmp_path):
    names = sorted(checkpoints) if world == 2 else sorted(THREE)
    results = run_pipelines(world, tmp_path, [checkpoints[n] for n in names])
    check_pipelines(results, names, (), references, world)
    for name in PACKED:
        if f"{name}_packed" in names:
            assert results[name]["checkpoint_bytes"] == results[f"{name}_packed"]["checkpoint_bytes"]


@pytest.mark.parametrize("model_type", sorted({c["model_type"] for c in FAM.values()} - set(UNRUNNABLE)))
def test_transformers_default_config_builds(model_type):
    """transformers' own default config of the type (which `test_config_defaults.py` reads)
    builds on meta, cut to 2 layers: the default sizes, not the default depth."""
    config = transformers.AutoConfig.for_model(model_type).to_dict()
    inner = config.get("text_config", config)
    depth = next(k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in inner)   # GPT-J's, GPT-Neo's names
    layers = inner[depth]
    short = {k: v[:2] if isinstance(v, list) and len(v) == layers else v for k, v in inner.items()}
    short[depth] = 2
    if "attention_types" in short:   # GPT-Neo's layer kinds, run-length coded
        short["attention_types"] = [[["global", "local"], 1]]
    with torch.device("meta"):
        model = build_model({**config, "text_config": short} if "text_config" in config else short)
    assert len(model.model.layers) == 2


@pytest.mark.parametrize("name", sorted(FAM))
def test_kv_reserve_per_layer_is_what_the_cache_keeps(name):
    """Each attention layer reserves ``2 * kv_heads * head_dim`` elements per token and keeps
    at most its window's tokens; a linear-attention layer reserves no KV (its fixed state
    instead); MoE layers cost less than all their experts."""
    with torch.device("meta"):
        model = build_model(fam_config(name).to_dict())
    config = fam_config(name).get_text_config()
    layers = [u for u in describe_model(model).units if ".layers." in u.name]
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    # no layer types: a window (phimoe's) covers every layer
    types = getattr(config, "layer_types", None) or [window and "sliding_attention"] * len(layers)
    if hasattr(config, "attention_layers"):   # GPT-Neo's kinds: local layers see window_size tokens
        window = config.window_size
        types = ["sliding_attention" if kind == "local" else "full_attention" for kind in config.attention_layers]
    assert len(layers) == config.num_hidden_layers
    per_token = config.kv_lora_rank + config.qk_rope_head_dim if hasattr(config, "kv_lora_rank") \
        else 2 * kv_heads * head_dim   # MLA keeps the latent
    assert [u.kv_per_token for u in layers] == [0 if t == "linear_attention" else per_token for t in types], name
    assert all(u.state_per_sequence > 0 for u, t in zip(layers, types) if t == "linear_attention"), name
    assert [u.kv_tokens for u in layers] == [window if t == "sliding_attention" else 0 for t in types], name
    if name in MOE:
        dense_cost = sum(2.0 * p.numel for u in layers for p in u.params if len(p.shape) >= 2)
        assert sum(u.cost for u in layers) < dense_cost


@pytest.mark.parametrize("name, neutral", [
    ("olmo", {"clip_qkv": None}),
    ("ministral", {"sliding_window": None}),
    ("hunyuan_v1_moe", {"moe_topk": 5}),
    ("phimoe", {"router_jitter_noise": 0.0}),
    ("cohere2_moe", {"shared_expert_combination_strategy": "sum"}),
    ("gpt2_scaled", {"scale_attn_by_inverse_layer_idx": False}),
    ("gpt_neo", {"window_size": 64}),
])
def test_the_logit_checks_see_each_transform(name, neutral, checkpoints, references):
    """Without the transform our logits are far from transformers': the checks above
    would catch a skipped clamp, window, routing top-k, SparseMixer band, shared-expert mean or
    GPT-2's per-layer score scale."""
    check_transform_seen(checkpoints[name], neutral, references[name][0])


@pytest.mark.parametrize("name, change, field", [
    ("ministral", {"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types"),
    ("ministral", {"sliding_window": 0}, "sliding_window"),
    ("olmo", {"clip_qkv": -1}, "clip_qkv"),
    ("helium", {"head_dim": 24}, "head_dim"),
    ("arcee", {"hidden_act": "swiglu9"}, "hidden_act"),
    ("internlm3", {"qkv_bias": "yes", "attention_bias": None}, "qkv_bias"),
    ("apertus", {"hidden_act": "xelu"}, "hidden_act"),
    ("hunyuan_v1_dense", {"rope_parameters": {"rope_type": "dynamic", "alpha": -2.0}}, "alpha"),
    ("hunyuan_v1_moe", {"moe_topk": [2, 2]}, "moe_topk"),
    ("hunyuan_v1_moe", {"moe_topk": 6}, "moe_topk"),
    ("hunyuan_v1_moe", {"num_experts": [5, 5, 5, 5]}, "num_experts"),
    ("stablelm", {"hidden_size": 66}, "num_attention_heads"),
    ("persimmon", {"qk_layernorm": "yes"}, "qk_layernorm"),
    ("nemotron", {"norm_eps": 0}, "norm_eps"),
    ("cwm", {"layer_types": ["full_attention"] * 3}, "layer_types"),
    ("exaone", {"num_hidden_layers": None, "num_layers": 0}, "num_hidden_layers"),
    ("iquestcoder", {"hidden_act": "tanh"}, "hidden_act"),
    ("jais2", {"layer_norm_eps": -1}, "layer_norm_eps"),
    ("vaultgemma", {"final_logit_softcapping": -1}, "final_logit_softcapping"),
    ("qwen3_5_moe_text", {"num_experts": 0}, "num_experts"),
    ("ernie4_5_moe", {"moe_k": 6}, "moe_k"),
    ("ernie4_5_moe", {"moe_norm_min": 0}, "moe_norm_min"),
    ("glm4_moe_lite", {"mlp_layer_types": ["dense"] * 3}, "mlp_layer_types"),
    ("dots1", {"n_routed_experts": None}, "n_routed_experts"),
    ("dots1", {"n_group": 4}, "n_group"),
    ("exaone_moe", {"mlp_layer_types": ["dense", "moe", "dense", "dense"]}, "mlp_layer_types"),
    ("exaone_moe", {"num_experts_per_tok": 7}, "num_experts_per_tok"),
    ("granitemoe", {"num_experts_per_tok": 6}, "num_experts_per_tok"),
    ("granitemoeshared", {"shared_intermediate_size": -3}, "shared_intermediate_size"),
    ("minimax_m2", {"rotary_dim": 48}, "rotary_dim"),
    ("phimoe", {"num_local_experts": 1, "num_experts_per_tok": 1}, "num_local_experts"),
    ("gptj", {"rotary_dim": 7}, "rotary_dim"),
    ("flex_olmo", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("youtu", {"qk_rope_head_dim": 5}, "qk_rope_head_dim"),
    ("bitnet", {"head_dim": 24}, "head_dim"),
    ("gptj", {"n_embd": "64"}, "n_embd"),
    ("codegen", {"n_head": 6, "n_embd": 96}, "n_head"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ("gpt2", {"n_head": 3}, "n_head"),
    ("gpt2", {"activation_function": "swish7"}, "activation_function"),
    ("gpt2", {"scale_attn_weights": "yes"}, "scale_attn_weights"),
    ("gpt2", {"n_positions": 0}, "n_positions"),
    ("gpt_bigcode", {"multi_query": 1}, "multi_query"),
    ("bloom", {"apply_residual_connection_post_layernorm": "yes"}, "apply_residual_connection_post_layernorm"),
    ("bloom", {"n_head": 5}, "n_head"),
    ("bloom", {"n_layer": 0}, "n_layer"),
    ("falcon", {"alibi": True}, "alibi"),
    ("falcon", {"multi_query": "yes"}, "multi_query"),
    ("falcon", {"num_ln_in_parallel_attn": 3}, "num_ln_in_parallel_attn"),
    ("falcon_new", {"num_kv_heads": 3}, "num_kv_heads"),
    ("gpt_neo", {"attention_types": [[["global", "local"], 3]]}, "attention_types"),
    ("gpt_neo", {"attention_types": [[["global", "sparse"], 2]]}, "attention_types"),
    ("gpt_neo", {"attention_types": "global"}, "attention_types"),
    ("opt", {"do_layer_norm_before": "no"}, "do_layer_norm_before"),
    ("opt", {"word_embed_proj_dim": -1}, "word_embed_proj_dim"),
    ("opt", {"ffn_dim": 0}, "ffn_dim"),
    ("opt", {"activation_function": "gelu9"}, "activation_function"),
    ("cohere2_moe", {"expert_selection_fn": "relu"}, "expert_selection_fn"),
    ("phimoe", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                    "long_factor": [2.0] * 8}}, "short_mscale"),
])
def test_bad_configs_name_the_field(name, change, field):
    config = {**fam_config(name).to_dict(), **change}
    with pytest.raises(ValueError, match=field):
        with torch.device("meta"):
            build_model(config)


@pytest.mark.parametrize("name", sorted(FAM))
def test_config_mutations_raise_only_value_errors(name):
    """Any JSON value in any key a family reads (top level, or in the nested text config):
    its config reads or is refused with a ValueError naming config.json's field, never
    another exception."""
    base = fam_config(name).to_dict()
    nested = "text_config" if name in NESTED else None
    inner = base[nested] if nested else base
    keys = sorted(k for k, v in inner.items() if not isinstance(v, dict)) + [
        "rope_scaling", "rope_parameters", "layer_types", "mlp_layer_types", "moe_topk", "rotary_dim",
        "num_layers", "qkv_bias", "n_embd", "n_head", "moe_num_experts", "moe_k"]
    check_config_mutations(base, keys, examples=15, nested=nested)
