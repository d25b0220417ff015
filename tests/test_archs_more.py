"""The frontier-era architectures (`tests/archs_more.py`) against transformers, with the
machinery of `test_archs.py`: checkpoints transformers writes (`save_pretrained`, >= 2
shards) — and, for GLM-4.5 and OLMoE, the same weights with packed experts — loaded across
2 and 3 ranks in one torchrun launch per world size (`workers/arch_pipeline.py`): logits
of a left-padded batch within 1e-4 (float32) of `from_pretrained`'s, 12 greedy tokens
identical, the ranks' bytes summing to the checkpoint's; on 2 ranks one MoE of each
routing kind again with half its layers on the disk tier (gpt-oss: top-k then softmax;
GLM-4.5: group-limited sigmoid; Llama 4: sigmoid-scaled inputs; softmax top-k is
test_archs.py's Qwen2-MoE). In one process: each family's transform is what the checks
see, the KV reserve per layer (a fixed state for linear attention), multimodal
checkpoints' text parts only, config errors naming the field, and that every registered
model type has a case somewhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import distload
from distload.meta import describe_model
from distload.models import build_model, supported_model_types
from distload.models.common.attention import position_ids_from_mask

from .arch_checks import (ATOL, case_references, check_config_mutations, check_pipelines, check_transform_seen,
                          make_checkpoints, run_pipelines)
from .archs import left_padded_batch
from .archs_more import MOE, MORE, NESTED, PACKED, more_config

transformers = pytest.importorskip("transformers")

DISK = ("gpt_oss", "glm4_moe_packed", "llama4_text")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory: every case, and `<moe>_packed` for `PACKED`."""
    return make_checkpoints(tmp_path_factory.mktemp("archs_more"), MORE, more_config, PACKED)


@pytest.fixture(scope="module")
def references(checkpoints):
    """name -> (logits, greedy tokens) of transformers on the left-padded batch."""
    return case_references(checkpoints, MORE, moe=MOE, nested=NESTED)


@pytest.mark.parametrize("world", [2, 3])
def test_more_architectures_across_ranks_match_transformers(world, checkpoints, references, tmp_path):
    names = sorted(checkpoints)
    disk = DISK if world == 2 else ()
    results = run_pipelines(world, tmp_path, [checkpoints[n] for n in names],
                            disk=[checkpoints[n] for n in disk])
    check_pipelines(results, names, disk, references, world)
    for name in PACKED:
        assert results[name]["checkpoint_bytes"] == results[f"{name}_packed"]["checkpoint_bytes"]


# ----------------------------------------------------------------------------- one process

@pytest.mark.parametrize("name, neutral", [
    ("gpt_oss", {"swiglu_limit": 1000.0}),                     # the clamps cut
    ("llama4_text", {"attn_temperature_tuning": False}),       # NoPE layers' temperature
    ("llama4_text", {"attention_chunk_size": 64}),             # chunks shorter than the prompt
    ("ministral3", {"rope_parameters": {**MORE["ministral3"]["rope_parameters"],
                                        "llama_4_scaling_beta": 0.0}}),
    ("cohere2", {"logit_scale": 1.0}),
    ("olmoe", {"clip_qkv": None}),
    ("glm4_moe", {"routed_scaling_factor": 1.0}),
])
def test_the_logit_checks_see_each_transform(name, neutral, checkpoints, references):
    """Without the transform our logits are far from transformers': the checks above would
    catch a skipped clamp, temperature, chunk, scale or router factor."""
    check_transform_seen(checkpoints[name], neutral, references[name][0])


@pytest.mark.parametrize("name", sorted(MORE))
def test_kv_reserve_per_layer_is_what_the_cache_keeps(name):
    """Each attention layer reserves ``2 * kv_heads * head_dim`` elements per token — what
    its `KVCache` entry holds (GPT-NeoX's fused per-head projection included); a
    linear-attention layer (Qwen3-Next) reserves its fixed float32 state per sequence,
    whatever the length, and no KV; the packed experts' bytes count in full, their FLOPs
    only for the active experts."""
    from distload.plan.reserve import RunShape, unit_reserves

    with torch.device("meta"):
        model = build_model(more_config(name).to_dict())
    config = more_config(name).get_text_config()
    spec = describe_model(model)
    layers = [u for u in spec.units if ".layers." in u.name]
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    types = list(getattr(config, "layer_types", None) or [])
    linear = [t == "linear_attention" for t in types] if "linear_attention" in types else [False] * len(layers)
    assert len(layers) == config.num_hidden_layers
    assert all(u.kv_per_token == (0 if lin else 2 * kv_heads * head_dim) for u, lin in zip(layers, linear)), name
    # a window of W (or a chunk of C) keeps at most W tokens while it runs, W - 1 between calls
    window = getattr(config, "sliding_window", None)
    spans = [window if t == "sliding_attention" else config.attention_chunk_size if t == "chunked_attention"
             else window if name == "ministral3" else None for t in (types or [None] * len(layers))]
    assert [u.kv_tokens for u in layers] == [w or 0 for w in spans], name
    if any(spans):
        short = unit_reserves(spec, RunShape(2, 64, "generate"), itemsize=2)
        for unit, res, w in zip(layers, short[1:], spans):
            assert res.kv_bytes == 2 * min(64, w or 64) * unit.kv_per_token * 2
    if any(linear):
        c = config
        conv = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
        state = conv * (c.linear_conv_kernel_dim - 1) + \
            c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim
        assert [u.state_per_sequence for u in layers] == [state if lin else 0 for lin in linear]
        short, long = (unit_reserves(spec, RunShape(3, n, "generate"), itemsize=2) for n in (16, 64))
        for unit, a, b, lin in zip(spec.units, short, long, [False] + linear):
            if lin:   # the same fixed state at any length: 3 sequences x float32
                assert a.kv_bytes == b.kv_bytes == 3 * state * 4
    if name in MOE:
        dense_cost = sum(2.0 * p.numel for u in layers for p in u.params if len(p.shape) >= 2)
        assert sum(u.cost for u in layers) < dense_cost   # not every expert runs


@torch.no_grad()
def test_windowed_layers_cache_only_their_window():
    """Decoding token by token, a sliding layer's cache keeps its window's last W - 1
    tokens and a chunked one its chunk's C - 1, while the layers count every token seen
    (positions, masks); global layers keep everything. The logits are those of one pass
    over the whole sequence."""
    from distload.models import KVCache

    for name, keep in (("gpt_oss", {"0": 3, "1": None}), ("llama4_text", {"0": 3, "1": None})):
        model = build_model(more_config(name).to_dict()).eval()
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():   # packed experts are allocated, not initialized
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        ids, mask = left_padded_batch(lengths=(9, 6))
        pos = position_ids_from_mask(mask)
        whole = model(ids, position_ids=pos, attention_mask=mask)
        cache = KVCache()
        out = [model(ids[:, :3], position_ids=pos[:, :3], attention_mask=mask[:, :3], cache=cache)]
        for t in range(3, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], position_ids=pos[:, t:t + 1], attention_mask=mask[:, :t + 1],
                             cache=cache))
        real = mask.bool()
        torch.testing.assert_close(torch.cat(out, 1)[real], whole[real], atol=ATOL, rtol=0)
        for key, kept in keep.items():
            assert cache.seq_length(key) == ids.shape[1]
            assert cache.kept_length(key) == (ids.shape[1] if kept is None else kept), (name, key)


@pytest.mark.parametrize("name, change, field", [
    ("gpt_oss", {"num_experts_per_tok": 6}, "num_experts_per_tok"),
    ("gpt_oss", {"layer_types": ["chunked_attention"] * 4}, "layer_types"),
    ("gpt_oss", {"swiglu_limit": -1}, "swiglu_limit"),
    ("glm4_moe", {"n_group": 4}, "n_group"),
    ("glm4_moe", {"routed_scaling_factor": "x"}, "routed_scaling_factor"),
    ("llama4_text", {"no_rope_layers": [1, 0]}, "no_rope_layers"),
    ("llama4_text", {"moe_layers": "all"}, "moe_layers"),
    ("llama4_text", {"floor_scale": 0}, "floor_scale"),
    ("olmoe", {"clip_qkv": -2}, "clip_qkv"),
    ("exaone4", {"sliding_window_pattern": "LXG", "layer_types": None}, "sliding_window_pattern"),
    ("ministral3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                        "llama_4_scaling_beta": "big"}}, "llama_4_scaling_beta"),
    ("gpt_neox", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("ernie4_5", {"use_bias": 3}, "use_bias"),
    ("cohere2", {"sliding_window": 0}, "sliding_window"),
    ("qwen3_next", {"layer_types": ["linear_attention", "mamba", "full_attention", "full_attention"]},
     "layer_types"),
    ("qwen3_next", {"linear_num_value_heads": 3}, "linear_num_value_heads"),
    ("qwen3_5_text", {"linear_conv_kernel_dim": 0}, "linear_conv_kernel_dim"),
])
def test_bad_configs_name_the_field(name, change, field):
    config = {**more_config(name).to_dict(), **change}
    with pytest.raises(ValueError, match=field):
        with torch.device("meta"):
            build_model(config)


@pytest.mark.parametrize("name", NESTED)
def test_a_multimodal_checkpoint_loads_its_text_part_only(name, checkpoints):
    """Llama 4's and Qwen3.5's hub checkpoints: the text model, under its plain names; no
    byte of the vision tower or projector is read."""
    path = checkpoints[name]
    pipe = distload.load(str(path), device="cpu")
    total = sum(m.stat().st_size for m in path.glob("*.safetensors"))
    assert pipe.module.config.nested_in == name
    keys = {p.key for s in pipe.plan.stages for p in s.params}
    assert keys and all(k.startswith(("model.", "lm_head.")) for k in keys)
    assert pipe.report["bytes_read"] == pipe.plan.checkpoint_bytes < total


# Where the cases compared against transformers live: every file here that builds
# checkpoints of registered types (test_archs_frontier.py: DeepSeek-V2/V3).
_CASE_FILES = ("archs.py", "archs_*.py", "test_archs*.py", "test_models.py", "test_pipeline.py")


def _case_model_types() -> set[str]:
    """Every ``"model_type": "<type>"`` of a dict literal in the case files."""
    found = set()
    here = Path(__file__).parent
    for pattern in _CASE_FILES:
        for path in here.glob(pattern):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Dict):
                    for key, value in zip(node.keys, node.values):
                        if isinstance(key, ast.Constant) and key.value == "model_type" \
                                and isinstance(value, ast.Constant) and isinstance(value.value, str):
                            found.add(value.value)
    return found


def test_every_registered_model_type_has_a_case():
    """A model type registered without a case compared against transformers fails here,
    naming it (the cases: any ``{"model_type": ...}`` in `_CASE_FILES`)."""
    missing = sorted(set(supported_model_types()) - _case_model_types())
    assert not missing, f"registered model types without a test case: {missing}"


@pytest.mark.parametrize("name", sorted(MORE))
def test_config_mutations_raise_only_value_errors(name):
    """Any JSON value in any key a family reads (top level, or in the nested text config):
    its config reads or is refused with a ValueError naming config.json's field, never
    another exception."""
    base = more_config(name).to_dict()
    nested = "text_config" if name in NESTED else None
    inner = base[nested] if nested else base
    keys = sorted(k for k, v in inner.items() if not isinstance(v, dict)) + [
        "rope_scaling", "rope_parameters", "layer_types", "no_rope_layers", "moe_layers", "mlp_only_layers",
        "sliding_window_pattern", "full_attention_interval", "rotary_pct", "rotary_emb_base"]
    check_config_mutations(base, keys, examples=40, nested=nested)
