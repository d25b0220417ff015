"""What the planner sees of real-size models, on the meta device: each type's config.json
(as published for the model named) built with no memory, its decoder layer's parameters
and bytes (bfloat16), its per-token FLOPs (a mixture of experts: the router, the active
experts and any shared expert — while its bytes count every expert), its KV cache per
token, and the whole model's size, against figures computed by hand from the configs.
"""

from __future__ import annotations

import pytest
import torch

from distload.meta import describe_model, init_empty_weights, module_sizes
from distload.models import build_model


def _cfg(model_type, vocab, hidden, inter, layers, heads, kv, **extra):
    return {"model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "max_position_embeddings": 8192, "torch_dtype": "bfloat16", **extra}


# Per type: (config, layer unit checked, its parameters, its FLOPs per token, KV elements per
# token, the model's parameters or None). Hand figures, with A = attention projections:
#   A = h*heads*d + 2*h*kv*d + heads*d*h (+ biases, + q/k norm weights); a SwiGLU MLP 3*h*i.
CASES = {
    # Qwen3-8B: A = 41,943,040 + 256 (q/k norms, 128 each); MLP 3*4096*12288; 2 norms.
    "qwen3": (_cfg("qwen3", 151936, 4096, 12288, 36, 32, 8, head_dim=128, rope_theta=1e6),
              "model.layers.0", 192_946_432, 385_875_968, 2 * 8 * 128, 8_190_735_360),
    # Qwen3-30B-A3B: A = 18,874,368 + 256; router 128*2048; 128 experts of 3*2048*768
    # (4,718,592); FLOPs 2*(A + router + 8 experts) = 2*56,885,248.
    "qwen3_moe": (_cfg("qwen3_moe", 151936, 2048, 6144, 48, 32, 4, head_dim=128, num_experts=128,
                       num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
                       rope_theta=1e6),
                  "model.layers.0", 623_120_640, 113_770_496, 2 * 4 * 128, 30_532_122_624),
    # Qwen1.5-MoE-A2.7B: A = 16,777,216 + 6,144 q/k/v biases; router 60*2048; 60 experts of
    # 3*2048*1408 (8,650,752), 4 active; shared expert 3*2048*5632 and its gate 2048.
    "qwen2_moe": (_cfg("qwen2_moe", 151936, 2048, 5632, 24, 16, 16, num_experts=60,
                       num_experts_per_tok=4, moe_intermediate_size=1408,
                       shared_expert_intermediate_size=5632),
                  "model.layers.0", 570_560_512, 172_216_320, 2 * 16 * 128, 14_315_784_192),
    # Mixtral-8x7B: A = 41,943,040; router 8*4096; 8 experts of 3*4096*14336 (176,160,768), 2
    # active: FLOPs 2*(41,943,040 + 32,768 + 352,321,536).
    "mixtral": (_cfg("mixtral", 32000, 4096, 14336, 32, 32, 8, num_local_experts=8,
                     num_experts_per_tok=2, rope_theta=1e6),
                "model.layers.0", 1_451_270_144, 788_594_688, 2 * 8 * 128, 46_702_792_704),
    # Gemma-7B: head_dim 256: A = 50,331,648; MLP 3*3072*24576; tied embedding.
    "gemma": (_cfg("gemma", 256000, 3072, 24576, 28, 16, 16, head_dim=256),
              "model.layers.0", 276_830_208, 553_648_128, 2 * 16 * 256, 8_537_680_896),
    # Gemma-2-27B: A = 56,623,104; MLP 3*4608*36864; 4 norms; tied embedding.
    "gemma2": (_cfg("gemma2", 256000, 4608, 36864, 46, 32, 16, head_dim=128,
                    query_pre_attn_scalar=144),
               "model.layers.0", 566_249_472, 1_132_462_080, 2 * 16 * 128, 27_227_128_320),
    # Gemma-3-1B: A = 2,949,120 + 512 (q/k norms); MLP 3*1152*6912; 4 norms.
    "gemma3_text": (_cfg("gemma3_text", 262144, 1152, 6912, 26, 4, 1, head_dim=256,
                         sliding_window=512),
                    "model.layers.5", 26_842_112, 53_673_984, 2 * 1 * 256, 999_885_952),
    # Gemma-3-4B's text model (nested: text_config of a gemma3 config.json).
    "gemma3": ({"model_type": "gemma3", "text_config": _cfg(
                    "gemma3_text", 262208, 2560, 10240, 34, 8, 4, head_dim=256, sliding_window=1024),
                "vision_config": {"hidden_size": 1152}},
               "model.layers.0", 94_382_592, 188_743_680, 2 * 4 * 256, None),
    # Phi-3-mini: qkv_proj 3072*9216 + o_proj; gate_up 3072*16384 + down: as separate ones.
    "phi3": (_cfg("phi3", 32064, 3072, 8192, 32, 32, 32),
             "model.layers.0", 113_252_352, 226_492_416, 2 * 32 * 96, 3_821_079_552),
    # OLMo-2-7B: A = 67,108,864 + 8,192 (q/k norms over all heads); MLP 3*4096*11008.
    "olmo2": (_cfg("olmo2", 100352, 4096, 11008, 32, 32, 32),
              "model.layers.0", 202_391_552, 404_750_336, 2 * 32 * 128, 7_298_617_344),
    # Granite-3.1-8B: A = 41,943,040; MLP 3*4096*12800; tied.
    "granite": (_cfg("granite", 49155, 4096, 12800, 40, 32, 8, tie_word_embeddings=True,
                     logits_scaling=16.0),
                "model.layers.0", 199_237_632, 398_458_880, 2 * 8 * 128, 8_170_848_256),
    # StarCoder2-15B: biases everywhere (13,312 on A), c_fc/c_proj 2*6144*24576 (+30,720
    # biases), two layer norms with biases (4*6144).
    "starcoder2": (_cfg("starcoder2", 49152, 6144, 24576, 40, 48, 4, norm_epsilon=1e-5),
                   "model.layers.0", 383_847_424, 767_557_632, 2 * 4 * 128, 15_655_899_136),
    # GLM-4-9B-0414: A = 35,651,584 + 4,608 q/k/v biases; gate_up + down 3*4096*13696; 4 norms.
    "glm4": (_cfg("glm4", 151552, 4096, 13696, 40, 32, 2, head_dim=128),
             "model.layers.0", 203_969_024, 407_896_064, 2 * 2 * 128, 9_400_279_040),
    # SmolLM3-3B: A = 10,485,760; MLP 3*2048*11008; tied.
    "smollm3": (_cfg("smollm3", 128256, 2048, 11008, 36, 16, 4),
                "model.layers.0", 78_123_008, 156_237_824, 2 * 4 * 128, 3_075_098_624),
    # Command-R (35B): A = 268,435,456; MLP 3*8192*22528; one layer norm; tied.
    "cohere": (_cfg("cohere", 256000, 8192, 22528, 40, 64, 64),
               "model.layers.0", 822_091_776, 1_644_167_168, 2 * 64 * 128, 34_980_831_232),
}


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_unit_sizes_and_costs_of_real_configs(model_type):
    config, unit_name, params, flops, kv, total = CASES[model_type]
    with init_empty_weights(include_buffers=False):
        model = build_model(config)
    spec = describe_model(model)
    units = {u.name: u for u in spec.units}
    unit = units[unit_name]
    assert sum(p.numel for p in unit.params) == params
    assert module_sizes(model, dtype=torch.bfloat16)[unit_name] == 2 * params
    assert unit.cost == flops
    assert unit.kv_per_token == kv
    layers = [u for u in spec.units if ".layers." in u.name]
    assert len(layers) == model.config.num_hidden_layers
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    assert units["lm_head"].cost == 2 * hidden * vocab
    if total is not None:
        assert sum(p.numel() for p in model.parameters()) == total
        assert module_sizes(model, dtype=torch.bfloat16)[""] == 2 * total


def test_an_moe_layer_costs_its_active_experts_and_weighs_all_of_them():
    config, unit_name, params, flops, _, _ = CASES["qwen3_moe"]
    with init_empty_weights(include_buffers=False):
        model = build_model(config)
    unit = next(u for u in describe_model(model).units if u.name == unit_name)
    # 2 FLOPs per weight would count all 128 experts; only 8 run per token.
    assert unit.cost < 0.2 * 2 * params
    # Activations per token: q, k, v, o, router, 8 experts' (768 + 768 + 2048), plus the
    # widest input (4096): not 128 experts' outputs.
    assert unit.act_per_token == 4096 + 512 + 512 + 2048 + 128 + 8 * (768 + 768 + 2048) + 4096


def test_a_headers_only_checkpoint_plans_as_the_real_one(tmp_path):
    """`scripts/make_checkpoint.py --headers-only`: real safetensors headers over a data
    area that is a hole in the file (no byte written), so a real-size MoE is planned (its
    experts' bytes, every rank's share) without its weights."""
    import importlib.util
    import json
    from pathlib import Path

    import distload

    spec = importlib.util.spec_from_file_location(
        "make_checkpoint", Path(__file__).resolve().parent.parent / "scripts" / "make_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config, _, params, _, _, _ = CASES["mixtral"]
    out = script.write_headers_only({**config, "num_hidden_layers": 2}, tmp_path / "mx",
                                    num_shards=3, dtype="bfloat16")
    files = sorted(out.glob("*.safetensors"))
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert len(files) == 3 and total == 2 * (2 * params + 2 * 32000 * 4096 + 4096)
    assert sum(f.stat().st_size for f in files) > total            # headers + the full data area
    assert sum(f.stat().st_blocks * 512 for f in files) < 1 << 20   # of which nothing is on disk
    plan = distload.plan_job(str(out), device="cpu")
    assert plan.checkpoint_bytes == total
    assert plan.unit_bytes["model.layers.0"] == 2 * params
