"""Tiny random checkpoints of the frontier architectures (DeepSeek-V2 and V3: multi-head
latent attention, YaRN with mscale, grouped routing with its correction bias, shared
experts, dense first layers), written by transformers itself (`save_pretrained`, >= 2
shards) with awkward sizes: no side a power of two, RoPE channels interleaved or halved,
with and without the query's low-rank path. Also their packed-expert layout and an FP8
copy (`tests.quant_ckpt`). Used by `test_archs_frontier.py` and its torchrun worker.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .archs import VOCAB

_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
         "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7, "rope_theta": 10000.0}
_MLA = {"vocab_size": VOCAB, "hidden_size": 56, "intermediate_size": 87, "num_hidden_layers": 4,
        "num_attention_heads": 4, "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "q_lora_rank": 22, "kv_lora_rank": 20, "qk_nope_head_dim": 10,
        "qk_rope_head_dim": 6, "v_head_dim": 12, "moe_intermediate_size": 23, "first_k_dense_replace": 1,
        "n_routed_experts": 8, "num_experts_per_tok": 3}

ARCHS: dict[str, dict] = {
    "deepseek_v3": {"model_type": "deepseek_v3", **_MLA, "n_shared_experts": 2, "n_group": 4,
                    "topk_group": 2, "routed_scaling_factor": 2.5, "rope_parameters": _YARN},
    # RoPE on halves, no query low-rank path, one group, weights not renormalized, tied head
    "deepseek_v3_plain": {"model_type": "deepseek_v3", **_MLA, "q_lora_rank": None,
                          "rope_interleave": False, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
                          "norm_topk_prob": False, "routed_scaling_factor": 1.5, "first_k_dense_replace": 2,
                          "tie_word_embeddings": True},
    "deepseek_v2": {"model_type": "deepseek_v2", **_MLA, "n_shared_experts": 2, "n_group": 4,
                    "topk_group": 2, "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5,
                    "attention_bias": True, "mlp_bias": True, "rope_parameters": _YARN},
    "deepseek_v2_lite": {"model_type": "deepseek_v2", **_MLA, "q_lora_rank": None, "topk_method": "greedy",
                         "n_shared_experts": 1, "first_k_dense_replace": 0},
}
MOE = tuple(ARCHS)
FP8_BLOCK = (16, 16)   # every matrix above has a side that is not a multiple of it


def hf_config(name: str):
    """transformers' own config object of frontier case `name`."""
    from transformers import AutoConfig

    kw = dict(ARCHS[name])
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def hf_model(config):
    """A randomly initialized transformers model of `config`, every parameter and the
    routers' correction biases (buffers in transformers) perturbed, seeded."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.08)
        for name, b in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn(b.shape, generator=gen) * 0.3)
    return model.eval()


def make_hf_checkpoint(name: str, out: Path) -> Path:
    """Write frontier case `name` with `save_pretrained` into `out`, in 3 or more shards."""
    model = hf_model(hf_config(name))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out, max_shard_size=f"{max(total // 3 // 1000, 1)}KB")
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out
