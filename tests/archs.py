"""Tiny random checkpoints of every built-in architecture, written by transformers itself
(each type's own config class, `from_config`, `save_pretrained` in >= 2 shards), with
awkward sizes: head_dim != hidden / heads where the type allows, GQA, odd intermediate
sizes, tied and untied heads, sliding windows shorter than the prompts, soft-caps and
multipliers large enough to change the logits. Also the other expert layout of the MoE
types (packed ``mlp.experts.gate_up_proj``), rewritten from a saved checkpoint with
safetensors. Used by `test_archs.py` and its torchrun worker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

VOCAB = 128
_BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 87, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_SLIDING4 = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]

ARCHS: dict[str, dict] = {
    "qwen3": {"model_type": "qwen3", "head_dim": 24, "attention_bias": True,
              "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2},
    "qwen3_moe": {"model_type": "qwen3_moe", "head_dim": 24, "num_experts": 6,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 23, "norm_topk_prob": True,
                  "mlp_only_layers": [2], "tie_word_embeddings": True},
    "qwen2_moe": {"model_type": "qwen2_moe", "head_dim": 24, "num_experts": 5,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 21,
                  "shared_expert_intermediate_size": 37, "decoder_sparse_step": 2,
                  "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 4},
    "mixtral": {"model_type": "mixtral", "head_dim": 24, "num_local_experts": 4,
                "num_experts_per_tok": 2, "sliding_window": 4, "tie_word_embeddings": True},
    "gemma": {"model_type": "gemma", "head_dim": 24},
    "gemma2": {"model_type": "gemma2", "head_dim": 24, "query_pre_attn_scalar": 20,
               "sliding_window": 4, "final_logit_softcapping": 2.0, "attn_logit_softcapping": 1.0},
    "gemma3_text": {"model_type": "gemma3_text", "head_dim": 24, "query_pre_attn_scalar": 20,
                    "sliding_window": 4, "layer_types": _SLIDING4, "final_logit_softcapping": 2.0,
                    "tie_word_embeddings": False, "rope_parameters": {
                        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    "gemma3": {"model_type": "gemma3", "head_dim": 24, "query_pre_attn_scalar": 24,
               "sliding_window": 4, "layer_types": _SLIDING4},
    # head_dim = hidden / heads: transformers checks longrope factors against that width.
    "phi3": {"model_type": "phi3", "num_key_value_heads": 2, "tie_word_embeddings": True,
             "original_max_position_embeddings": 64, "rope_parameters": {
                 "rope_type": "longrope", "rope_theta": 10000.0,
                 "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [2.0 + 0.5 * i for i in range(8)]}},
    "olmo2": {"model_type": "olmo2", "head_dim": 24},
    "granite": {"model_type": "granite", "head_dim": 24, "embedding_multiplier": 3.0,
                "attention_multiplier": 0.3, "residual_multiplier": 0.5, "logits_scaling": 4.0,
                "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    "starcoder2": {"model_type": "starcoder2", "head_dim": 24, "sliding_window": 4,
                   "tie_word_embeddings": False},
    "glm4": {"model_type": "glm4", "head_dim": 24, "tie_word_embeddings": True},
    "smollm3": {"model_type": "smollm3", "head_dim": 24, "use_sliding_window": True,
                "sliding_window": 4, "no_rope_layer_interval": 2},
    "cohere": {"model_type": "cohere", "head_dim": 24, "use_qk_norm": True, "logit_scale": 0.5},
}
MOE = ("qwen3_moe", "qwen2_moe", "mixtral")


def hf_config(name: str):
    """transformers' own config object of architecture `name`."""
    from transformers import AutoConfig, Gemma3Config, SiglipVisionConfig

    kw = {**_BASE, **ARCHS[name]}
    model_type = kw.pop("model_type")
    if model_type != "gemma3":
        return AutoConfig.for_model(model_type, **kw)
    text = AutoConfig.for_model("gemma3_text", **kw).to_dict()
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    return Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
                        image_token_index=VOCAB - 1)


def hf_model(config):
    """A randomly initialized transformers model of `config`, every parameter perturbed
    (seeded), so that zero-initialized norms and biases matter too."""
    import transformers

    torch.manual_seed(0)
    if config.model_type == "gemma3":
        model = transformers.Gemma3ForConditionalGeneration(config)
    elif getattr(config, "vision_config", None) is not None:   # another multimodal checkpoint
        model = transformers.AutoModelForImageTextToText.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.08)
    return model.eval()


def make_hf_checkpoint(name: str, out: Path, config=None) -> Path:
    """Write architecture `name` (or transformers' `config`) with `save_pretrained` into
    `out`, in 3 or more shards."""
    model = hf_model(hf_config(name) if config is None else config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out, max_shard_size=f"{max(total // 3 // 1000, 1)}KB")
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out


_PER_EXPERT = re.compile(r"^(.+\.layers\.\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_GATE_UP_DOWN = {"gate_proj": 0, "up_proj": 1, "down_proj": 2, "w1": 0, "w3": 1, "w2": 2}


def repack_experts(src: Path, dst: Path) -> Path:
    """`src` (one tensor per expert, the hub's layout) rewritten into transformers 5's
    in-memory layout: ``<layer>.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (each expert's
    gate rows, then up rows), ``<layer>.mlp.experts.down_proj`` ``[E, H, I]``, Mixtral's
    ``block_sparse_moe.`` renamed ``mlp.``; same shards, same weights."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards: dict[str, dict[str, torch.Tensor]] = {}
    experts: dict[str, dict[int, list]] = {}
    home: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(src / shard, framework="pt") as f:
            for key in f.keys():
                match = _PER_EXPERT.match(key)
                if match is None:
                    shards.setdefault(shard, {})[key.replace(".block_sparse_moe.", ".mlp.")] = f.get_tensor(key)
                    continue
                layer, e, kind = match[1], int(match[3]), _GATE_UP_DOWN[match[4]]
                experts.setdefault(layer, {}).setdefault(e, [None, None, None])[kind] = f.get_tensor(key)
                home.setdefault(layer, shard)
    for layer, by_expert in experts.items():
        order = [by_expert[e] for e in sorted(by_expert)]
        out = shards.setdefault(home[layer], {})
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat(m[:2]) for m in order])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([m[2] for m in order])
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, dst / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": index.get("metadata", {}), "weight_map": dict(sorted(weight_map.items()))}))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def left_padded_batch(lengths=(10, 7, 3, 10, 1), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] (padding holds token 0) and the 0/1 attention mask."""
    width = max(lengths)
    ids = torch.randint(3, VOCAB - 3, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def save_in_memory_layout(model, out: Path, shard_of=lambda key: "model.safetensors") -> Path:
    """`model`'s state dict as transformers holds it in memory (transformers 5: packed
    experts, which a model built from the config expects key for key, unlike the hub's
    layout `save_pretrained` writes), in the shards `shard_of(key)` names, with an index
    and the config."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in model.state_dict().items():
        shards.setdefault(shard_of(key), {})[key] = tensor.contiguous()
    for shard, tensors in shards.items():
        save_file(tensors, out / shard, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, ts in sorted(shards.items()) for k in sorted(ts)}}))
    return out
