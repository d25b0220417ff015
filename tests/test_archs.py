"""Every built-in architecture beyond the Llama family against transformers, the independent
reference: checkpoints that transformers itself writes (`save_pretrained`, >= 2 shards) —
and, for the MoE types, the same weights with packed experts — loaded across 2 and 3 ranks
under torchrun (one launch per world size loops over all of them): logits of a left-padded
batch within 1e-4 (float32) of `from_pretrained`'s, greedy `generate` identical for 12
tokens, and the ranks' bytes summing to the checkpoint's; plus one MoE type with layers on
the disk tier. In one process: final-logit transforms are what the logits check sees,
longrope past its pretraining length, config errors naming the field, nested text models.
"""

from __future__ import annotations

import json

import pytest
import torch

import distload
from distload.models import KVCache, build_model, config_from_dict
from distload.meta import materialize
from distload.pipeline.microbatch import position_ids_from_mask

from .archs import ARCHS, MOE, VOCAB, hf_config, hf_model, left_padded_batch
from .arch_checks import (ATOL, JSON_VALUES, check_config_mutations, check_pipelines, make_checkpoints,
                          reference_outputs, run_pipelines)

transformers = pytest.importorskip("transformers")


def _reference_model(path, name: str):
    cls = transformers.Gemma3ForConditionalGeneration if name == "gemma3" \
        else transformers.AutoModelForCausalLM
    # transformers' grouped_mm experts need 16-byte strides, which odd sizes lack.
    kw = {"experts_implementation": "eager"} if name in MOE else {}
    model = cls.from_pretrained(path, dtype=torch.float32, **kw).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory: every architecture, and `<moe>_packed` for the MoE types."""
    return make_checkpoints(tmp_path_factory.mktemp("archs"), ARCHS, hf_config, MOE)


@pytest.fixture(scope="module")
def references(checkpoints):
    """name -> (logits, greedy tokens) of transformers on the left-padded batch."""
    return {name: reference_outputs(_reference_model(checkpoints[name], name)) for name in ARCHS}


@pytest.mark.parametrize("world", [2, 3])
def test_every_architecture_across_ranks_matches_transformers(world, checkpoints, references, tmp_path):
    names = sorted(checkpoints)
    disk = ["qwen2_moe_packed"] if world == 2 else []
    results = run_pipelines(world, tmp_path, [checkpoints[n] for n in names],
                            disk=[checkpoints[n] for n in disk])
    check_pipelines(results, names, disk, references, world)
    # Both expert layouts are the same bytes of the same weights.
    for name in MOE:
        assert results[name]["checkpoint_bytes"] == results[f"{name}_packed"]["checkpoint_bytes"]


# ----------------------------------------------------------------------------- one process

def _load_one(path, config_overrides: dict | None = None):
    """Our model of a checkpoint, in one process (world of 1), optionally with config.json
    keys replaced (written to a copy beside it)."""
    if config_overrides:
        import shutil
        copy = path.parent / (path.name + "_edited")
        if not copy.exists():
            shutil.copytree(path, copy)
        config = json.loads((path / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, **config_overrides}))
        path = copy
    return distload.load(str(path), device="cpu")


@pytest.mark.parametrize("name, neutral", [
    ("gemma2", {"final_logit_softcapping": None}), ("gemma2", {"attn_logit_softcapping": None}),
    ("granite", {"logits_scaling": 1.0}), ("granite", {"embedding_multiplier": 1.0}),
    ("cohere", {"logit_scale": 1.0}),
])
def test_the_logit_checks_see_each_transform(name, neutral, checkpoints, references):
    """Without a transform our logits are far from transformers': the checks above would
    catch a skipped soft-cap, scale or multiplier (also in generation: its last-position
    logits come from the same `forward`)."""
    pipe = _load_one(checkpoints[name], neutral)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = pipe.forward(ids, mask)
        last = pipe.module(ids, position_ids=position_ids_from_mask(mask), attention_mask=mask,
                           last_only=True)
    ref = references[name][0]
    real = mask.bool()
    assert (logits[real] - ref[real]).abs().max() > 100 * ATOL
    assert (last - ref[:, -1]).abs().max() > 100 * ATOL


@torch.no_grad()
def test_longrope_switches_to_long_factors_past_the_pretraining_length(checkpoints):
    """Phi-3's longrope: one forward whose positions pass `original_max_position_embeddings`
    uses the long factors (as transformers decides per call), and decoding one sequence
    through the KV cache across that length matches transformers' `generate`."""
    path = checkpoints["phi3"]
    original = json.loads((path / "config.json").read_text())["rope_parameters"]
    edited = {"original_max_position_embeddings": 8,
              "rope_parameters": {**original, "original_max_position_embeddings": 8}}
    pipe = _load_one(path, edited)
    ref = _reference_model(path.parent / (path.name + "_edited"), "phi3")
    ids, mask = left_padded_batch(lengths=(12, 9))
    pos = position_ids_from_mask(mask)
    ours = pipe.module(ids, position_ids=pos, attention_mask=mask)
    theirs = ref(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=0)
    short = _load_one(path)  # same weights, every position within the pretraining length
    assert (short.module(ids, position_ids=pos, attention_mask=mask)[real] - ours[real]).abs().max() > 1e-3
    # One sequence of 5 tokens decoded to 14: positions cross 8 during the decode.
    prompt = ids[:1, -5:]
    want = ref.generate(prompt, max_new_tokens=9, do_sample=False, pad_token_id=0)
    cache, seq = KVCache(), prompt
    logits = pipe.module(seq, position_ids=torch.arange(5)[None], cache=cache, last_only=True)
    for step in range(9):
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        if step < 8:
            logits = pipe.module(seq[:, -1:], position_ids=torch.tensor([[seq.shape[1] - 1]]),
                                 cache=cache, last_only=True)
    assert torch.equal(seq, want)


@pytest.mark.parametrize("name", MOE)
def test_accelerate_workflow_on_an_moe_checkpoint(name, checkpoints, references, tmp_path):
    """accelerate's workflow, only the import changed, on the hub's layout (one tensor per
    expert): transformers' own model packs its experts, so the load names the layouts and
    how to load it; distload's model of the same config loads with layers on the cpu and
    disk tiers and gives transformers' logits."""
    from distload import init_empty_weights, infer_auto_device_map, load_checkpoint_and_dispatch
    from distload.errors import LoadError

    path = checkpoints[name]
    with init_empty_weights():
        theirs = transformers.AutoModelForCausalLM.from_config(hf_config(name))
    with pytest.raises(LoadError, match=r"packs its experts.*one tensor per expert.*build_model"):
        load_checkpoint_and_dispatch(theirs, str(path), device_map={"": "cpu"})
    with init_empty_weights():
        model = build_model(json.loads((path / "config.json").read_text()))
    layer = sum(p.numel() * 4 for p in model.model.layers["0"].parameters())
    device_map = infer_auto_device_map(model, max_memory={"cpu": int(2.5 * layer), "disk": "1GB"})
    assert {"cpu", "disk"} <= set(device_map.values())
    model = load_checkpoint_and_dispatch(model, str(path), device_map=device_map,
                                         offload_folder=str(tmp_path / "offload"))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], references[name][0][real], atol=ATOL, rtol=0)


def test_gemma3_nested_text_model_loads_its_text_part_only(checkpoints):
    path = checkpoints["gemma3"]
    pipe = distload.load(str(path), device="cpu")
    total = sum(m.stat().st_size for m in path.glob("*.safetensors"))
    assert pipe.module.config.model_type == "gemma3_text" and pipe.module.config.nested_in == "gemma3"
    keys = {p.key for s in pipe.plan.stages for p in s.params}
    assert keys and all(k.startswith(("model.", "lm_head.")) for k in keys)
    assert pipe.report["bytes_read"] == pipe.plan.checkpoint_bytes < total  # vision tower unread


def test_a_multimodal_type_without_a_loadable_text_part_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'llava'.*nests a 'llama' text model.*gemma3"):
        config_from_dict({"model_type": "llava", "text_config": {"model_type": "llama"}})


@pytest.mark.parametrize("name, change, field", [
    ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("qwen3_moe", {"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ("qwen2_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen2_moe", {"mlp_only_layers": ["a"]}, "mlp_only_layers"),
    ("mixtral", {"num_local_experts": -1}, "num_local_experts"),
    ("gemma2", {"hidden_activation": "swiglu9"}, "hidden_activation"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3_text", {"layer_types": ["chunked_attention"] * 4}, "layer_types"),
    ("phi3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0]}}, "long_factor"),
    ("glm4", {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 1.5}},
     "partial_rotary_factor"),
    ("granite", {"logits_scaling": 0}, "logits_scaling"),
    ("cohere", {"logit_scale": "big"}, "logit_scale"),
    ("smollm3", {"no_rope_layers": [1, 0]}, "no_rope_layers"),
    ("starcoder2", {"num_attention_heads": 5}, "num_attention_heads"),
    ("olmo2", {"hidden_size": None}, "hidden_size"),
    ("gemma3", {"text_config": None}, "text_config"),
])
def test_bad_configs_name_the_field(name, change, field):
    config = {**hf_config(name).to_dict(), **change}
    with pytest.raises(ValueError, match=field):
        with torch.device("meta"):
            build_model(config)


@torch.no_grad()
def test_split_stages_with_their_own_caches_chain_to_the_whole_model():
    """Any cut of a model with sliding-window, local-RoPE and RoPE-less layers: the two
    stages chained (each with its own KV cache, decoding token by token) give the whole
    model's logits."""
    for name in ("gemma3_text", "smollm3", "qwen2_moe"):
        config = hf_config(name).to_dict()
        torch.manual_seed(0)
        whole = build_model(config).eval()
        state = whole.state_dict()
        ids, mask = left_padded_batch(lengths=(9, 6))
        pos = position_ids_from_mask(mask)
        full = whole(ids, position_ids=pos, attention_mask=mask)

        def part(keep):
            with torch.device("meta"):
                m = build_model(config)
            keep(m)
            materialize(m, "cpu")
            wanted = set(m.state_dict()) | ({"model.embed_tokens.weight"} if m.config.tie_word_embeddings else set())
            m.load_state_dict({k: v for k, v in state.items() if k in wanted}, assign=True)
            return m.eval()

        def first(m):
            for key in ("2", "3"):
                del m.model.layers[key]
            m.model.norm = m.lm_head = None

        def second(m):
            m.model.embed_tokens = None
            for key in ("0", "1"):
                del m.model.layers[key]

        a, b = part(first), part(second)
        ca, cb = a.new_cache(), b.new_cache()
        out = [b(a(ids[:, :4], position_ids=pos[:, :4], attention_mask=mask[:, :4], cache=ca),
                 position_ids=pos[:, :4], attention_mask=mask[:, :4], cache=cb)]
        for t in range(4, ids.shape[1]):
            kw = {"position_ids": pos[:, t:t + 1], "attention_mask": mask[:, :t + 1]}
            out.append(b(a(ids[:, t:t + 1], cache=ca, **kw), cache=cb, **kw))
        real = mask.bool()
        torch.testing.assert_close(torch.cat(out, 1)[real], full[real], atol=ATOL, rtol=0)


def test_hf_model_helper_is_seeded():
    """The checkpoints above are the same on every run (so are their references)."""
    a, b = hf_model(hf_config("glm4")), hf_model(hf_config("glm4"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert VOCAB == a.config.vocab_size


def test_packed_experts_become_exact_byte_ranges():
    """Hand-built metadata: expert e's gate, up and down matrices are the contiguous byte
    ranges of the packed tensors, together exactly their bytes; other keys of a Mixtral
    block move under `block_sparse_moe`; a pickled or misshapen packed tensor is refused."""
    from distload.checkpoint.types import TensorMeta
    from distload.models.common.moe import unpack_experts

    # 3 experts, I = 2, H = 4, bfloat16: gate_up [3, 4, 4] = 96 bytes, down [3, 4, 2] = 48.
    gate_up = TensorMeta("model.layers.1.mlp.experts.gate_up_proj", "a.safetensors", "bfloat16",
                         (3, 4, 4), 1000, 96)
    down = TensorMeta("model.layers.1.mlp.experts.down_proj", "b.safetensors", "bfloat16", (3, 4, 2), 8, 48)
    router = TensorMeta("model.layers.1.mlp.gate.weight", "b.safetensors", "bfloat16", (3, 4), 56, 24)
    out = unpack_experts({m.name: m for m in (gate_up, down, router)}, block="block_sparse_moe",
                         names=("w1", "w3", "w2"), packed_blocks=("mlp", "block_sparse_moe"))
    p = "model.layers.1.block_sparse_moe"
    assert out[f"{p}.gate.weight"] == TensorMeta(f"{p}.gate.weight", "b.safetensors", "bfloat16", (3, 4), 56, 24)
    for e in range(3):
        w1, w3, w2 = (out[f"{p}.experts.{e}.{w}.weight"] for w in ("w1", "w3", "w2"))
        assert (w1.file, w1.shape, w1.offset, w1.length) == ("a.safetensors", (2, 4), 1000 + 32 * e, 16)
        assert (w3.shape, w3.offset, w3.length) == ((2, 4), 1000 + 32 * e + 16, 16)
        assert (w2.file, w2.shape, w2.offset, w2.length) == ("b.safetensors", (4, 2), 8 + 16 * e, 16)
        assert w1.name == f"{p}.experts.{e}.w1.weight"
    assert sum(m.length for m in out.values()) == 96 + 48 + 24
    # Qwen names stay where they are.
    qwen = unpack_experts({gate_up.name: gate_up}, block="mlp")
    assert sorted(qwen)[:2] == ["model.layers.1.mlp.experts.0.gate_proj.weight",
                                "model.layers.1.mlp.experts.0.up_proj.weight"]
    import dataclasses
    with pytest.raises(ValueError, match="pickled"):
        unpack_experts({gate_up.name: dataclasses.replace(gate_up, offset=-1)}, block="mlp")
    with pytest.raises(ValueError, match=r"shape \[3, 5, 4\]"):
        unpack_experts({gate_up.name: dataclasses.replace(gate_up, shape=(3, 5, 4))}, block="mlp")




@pytest.mark.parametrize("name", sorted(ARCHS))
def test_config_mutations_raise_only_value_errors(name):
    """Any JSON value in any key a family reads: its config reads or is refused with a
    ValueError (which the loader turns into one line naming config.json), never another
    exception."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    base = hf_config(name).to_dict()
    keys = sorted(k for k, v in base.items() if not isinstance(v, dict)) + [
        "rope_scaling", "rope_parameters", "text_config", "layer_types", "no_rope_layers",
        "mlp_only_layers", "partial_rotary_factor", "original_max_position_embeddings"]
    check_config_mutations(base, keys, examples=25)

    rope_keys = ("factor", "low_freq_factor", "high_freq_factor", "short_factor", "long_factor",
                 "original_max_position_embeddings", "attention_factor", "rope_theta",
                 "partial_rotary_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")

    @settings(max_examples=25, deadline=None)
    @given(kind=st.sampled_from(["default", "linear", "llama3", "yarn", "longrope", "su", "dynamic", 7]),
           fields=st.dictionaries(st.sampled_from(rope_keys), JSON_VALUES, max_size=4))
    def mutate_rope(kind, fields):
        try:
            config_from_dict({**base, "rope_scaling": {"rope_type": kind, **fields}})
        except ValueError:
            pass

    mutate_rope()
