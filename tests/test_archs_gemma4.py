"""Gemma 4 (``gemma4_text``, and the text part of a ``gemma4`` multimodal checkpoint)
against transformers, with the machinery of `test_archs.py`: checkpoints transformers
writes (`save_pretrained`, >= 2 shards, awkward sizes, every weight and each layer's
`layer_scalar` perturbed) loaded across 2 and 3 ranks in one torchrun launch per world size
(`workers/arch_pipeline.py`): logits of a left-padded batch within 1e-4 (float32) of
`from_pretrained`'s, 12 greedy tokens identical, the ranks' bytes summing to the checkpoint's;
on 2 ranks both cases again with half of each stage's layers on the disk tier.

The first case has all of Gemma 4's parts at once: per-layer embeddings (sent beside the
hidden states to the later stages), KV sharing (the last 2 layers reuse the keys and values
of layers 1 and 3, which the planner keeps on their stage), global layers of another head
size with keys as values (`attention_k_eq_v`) and one KV head, proportional RoPE, a window
shorter than the prompts, double-wide MLPs on the sharing layers, soft-capped logits. The
second is the 26B-A4B's shape: no PLE, no sharing, experts beside each MLP, biases, an
untied head. In one process: the KV reserve (sharing layers count nothing, their source
once), the planner's joined units, config errors naming the field, the multimodal
checkpoint's text part (logits and tokens too), continuous batching.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

import distload
from distload.errors import PlanError
from distload.meta import describe_model
from distload.models import KVCache, build_model
from distload.models.common.attention import position_ids_from_mask
from distload.plan.budget import RankBudget
from distload.plan.planner import partition, unit_loads
from distload.plan.reserve import RunShape, unit_reserves
from distload.plan.stage import UnitLoad

from .arch_checks import check_config_mutations, check_greedy_answers
from .archs import _BASE, VOCAB, hf_model, left_padded_batch
from .mp import torchrun, worker

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4ForCausalLM"):
    pytest.skip("this transformers has no Gemma 4", allow_module_level=True)

ATOL = 1e-4
NEW = 12
S, F = "sliding_attention", "full_attention"

GEMMA4: dict[str, dict] = {
    "gemma4_text": {"model_type": "gemma4_text", "num_hidden_layers": 6, "head_dim": 24,
                    "global_head_dim": 40, "layer_types": [S, F, S, S, S, F], "sliding_window": 4,
                    "num_kv_shared_layers": 2, "hidden_size_per_layer_input": 12,
                    "vocab_size_per_layer_input": VOCAB, "attention_k_eq_v": True,
                    "num_global_key_value_heads": 1, "use_double_wide_mlp": True,
                    "final_logit_softcapping": 2.0, "rope_parameters": {
                        S: {"rope_type": "default", "rope_theta": 1e4},
                        F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e6}}},
    "gemma4_text_moe": {"model_type": "gemma4_text", "head_dim": 24, "global_head_dim": 32,
                        "hidden_size_per_layer_input": 0, "sliding_window": 5,
                        "tie_word_embeddings": False, "attention_bias": True, "enable_moe_block": True,
                        "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 23},
}
# The hub's multimodal checkpoint: a tiny vision tower beside the first case.
NESTED = {"model_type": "gemma4", "text": "gemma4_text"}


def gemma4_config(name: str):
    """transformers' own config object of case `name` ("gemma4": the multimodal one)."""
    if name == "gemma4":
        text = gemma4_config(NESTED["text"]).to_dict()
        vision = transformers.Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                                 patch_size=4, position_embedding_size=64)
        return transformers.Gemma4Config(
            text_config=text, vision_config=vision.to_dict(), boi_token_id=250, eoi_token_id=251,
            image_token_id=252, video_token_id=253, boa_token_id=254, eoa_token_index=255,
            audio_token_id=256)   # past the vocabulary: no prompt or greedy token is an image's
    kw = {**_BASE, **GEMMA4[name]}
    return transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)


def make_checkpoint(name: str, out: Path) -> Path:
    """`save_pretrained` in >= 2 shards, every weight and each `layer_scalar` (a buffer)
    perturbed."""
    model = hf_model(gemma4_config(name))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, buf in sorted(model.named_buffers()):
            if key.endswith("layer_scalar"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out, max_shard_size=f"{max(total // 3 // 1000, 1)}KB")
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4")
    return {name: make_checkpoint(name, root / name) for name in [*GEMMA4, "gemma4"]}


@pytest.fixture(scope="module")
def references(checkpoints):
    """name -> (logits, greedy tokens) of transformers on the left-padded batch."""
    ids, mask = left_padded_batch()
    refs = {}
    for name, path in checkpoints.items():
        cls = transformers.AutoModelForImageTextToText if name == "gemma4" else transformers.AutoModelForCausalLM
        # transformers' grouped_mm experts need 16-byte strides, which odd sizes lack.
        kw = {"experts_implementation": "eager"} if name == "gemma4_text_moe" else {}
        model = cls.from_pretrained(path, dtype=torch.float32, **kw).eval()
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        refs[name] = (logits, tokens)
    return refs


def test_the_checkpoint_has_what_the_cases_test(checkpoints):
    """The weights the checks depend on are there: PLE tables, no k/v projections in the
    sharing layers, no v_proj in the global layers (keys as values), scalars not 1."""
    from safetensors import safe_open

    keys, scalars = set(), []
    for shard in checkpoints["gemma4_text"].glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            keys |= set(f.keys())
            scalars += [f.get_tensor(k).item() for k in f.keys() if k.endswith("layer_scalar")]
    assert {"model.embed_tokens_per_layer.weight", "model.per_layer_model_projection.weight"} <= keys
    assert "model.layers.3.self_attn.k_proj.weight" in keys and "model.layers.1.self_attn.v_proj.weight" not in keys
    assert not any(k.startswith(("model.layers.4.self_attn.k_", "model.layers.5.self_attn.v_")) for k in keys)
    assert len(scalars) == 6 and all(s != 1.0 for s in scalars)


@pytest.mark.parametrize("world", [2, 3])
def test_gemma4_across_ranks_matches_transformers(world, checkpoints, references, tmp_path):
    names = sorted(GEMMA4)   # the multimodal checkpoint's text model is the first case's: one process below
    # on 2 ranks, both again with half of each stage's layers streamed from the disk tier
    disk = [a for n in names for a in ("--disk", str(checkpoints[n]))] if world == 2 else []
    proc = torchrun(world, [worker("arch_pipeline.py"), str(tmp_path), *disk, *(str(checkpoints[n]) for n in names)],
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(tmp_path / "results.pt")
    ids, mask = left_padded_batch()
    real = mask.bool()
    for name in names + ([f"{n}@disk" for n in names] if disk else []):
        got, (ref_logits, ref_tokens) = results[name], references[name.removesuffix("@disk")]
        assert got["logits"].shape == ref_logits.shape, name
        err = (got["logits"][real] - ref_logits[real]).abs().max().item()
        assert err <= ATOL, f"{name}: logits differ from transformers' by {err:.2e}"
        assert torch.equal(got["tokens"], ref_tokens), f"{name}: greedy tokens differ"
        ranks = got["job_report"]["ranks"]
        on_disk = sum(r["offloaded_bytes_by_tier"]["disk"] for r in ranks)
        assert sum(r["bytes_read"] for r in ranks) + on_disk == got["checkpoint_bytes"], name
        assert (on_disk > 0 and all(r["offloaded_bytes"] > 0 for r in ranks)) == name.endswith("@disk")
        units = got["units"]
        assert len(units) == world and all(units), name
        if name.removesuffix("@disk") == "gemma4_text":   # PLE with the embedding; KV sharing on one stage
            stage_of = {u: r for r, us in enumerate(units) for u in us}
            assert stage_of["model.embed_tokens_per_layer"] == stage_of["model.embed_tokens"] == 0
            assert len({stage_of[f"model.layers.{i}"] for i in range(1, 6)}) == 1, units


# ----------------------------------------------------------------------------- one process

def _meta_model(name: str):
    with torch.device("meta"):
        return build_model(gemma4_config(name).to_dict())


@pytest.mark.parametrize("name", sorted(GEMMA4))
def test_kv_reserve_counts_each_cache_once(name):
    """Each layer reserves ``2 * kv_heads * head_dim`` elements per token of its own type
    (global layers: their own head size and KV heads), a KV-sharing layer nothing; and a
    prefill's `KVCache` holds exactly that: one entry per layer that computes keys (a
    window's W - 1 tokens), none for the layers that reuse them."""
    config = gemma4_config(name)
    layers = [u for u in describe_model(_meta_model(name)).units if ".layers." in u.name]
    shared = config.num_kv_shared_layers
    n = config.num_hidden_layers
    expect = []
    for i, kind in enumerate(config.layer_types):
        sub = config.per_layer_config[i]   # transformers' own view of layer i
        expect.append(0 if i >= n - shared else 2 * sub.num_key_value_heads * sub.head_dim)
    assert [u.kv_per_token for u in layers] == expect
    side = 2 * n * (config.hidden_size_per_layer_input or 0)   # PLE inputs held and sent on
    assert all(u.act_per_token > side + config.hidden_size for u in layers)
    model = build_model(gemma4_config(name).to_dict()).eval()
    ids, mask = left_padded_batch(lengths=(9, 6))
    cache = KVCache()
    with torch.no_grad():
        for p in model.parameters():   # packed experts are allocated, not initialized
            p.normal_(0, 0.1)
        model(ids, position_ids=position_ids_from_mask(mask), attention_mask=mask, cache=cache)
    window = config.sliding_window
    kept = [min(ids.shape[1], window - 1) if kind == S else ids.shape[1] for kind in config.layer_types]
    assert cache.nbytes() == sum(2 * e * k * 4 for e, k in zip(expect, kept))
    assert [cache.kept_length(str(i)) for i in range(n)] == kept[:n - shared] + [0] * shared
    spec = describe_model(_meta_model(name))
    reserves = unit_reserves(spec, RunShape(2, 64, "generate"), itemsize=2)
    spans = [window if kind == S else 64 for kind in config.layer_types]
    layer_kv = [r.kv_bytes for u, r in zip(spec.units, reserves) if ".layers." in u.name]
    assert layer_kv == [2 * min(64, w) * e * 2 for w, e in zip(spans, expect)]


def test_joined_units_keep_ple_and_shared_kv_on_one_stage():
    """PLE's modules follow the embedding and the layers from the first KV source (1) to
    the last are joined: every split the planner makes keeps them together, and a world
    with more ranks than places to split is refused by name."""
    spec = describe_model(_meta_model("gemma4_text"))
    assert spec.joined == ("model.embed_tokens_per_layer", "model.per_layer_model_projection",
                           "model.per_layer_projection_norm", *(f"model.layers.{i}" for i in range(2, 6)))
    loads = unit_loads(spec, {p.name: p.numel * 4 for u in spec.units for p in u.params})
    names = [u.name for u in spec.units]
    for world in (2, 3, 4, 5):
        bounds = partition(loads, [RankBudget(device=1 << 30)] * world).bounds
        assert not {names[b] for b in bounds[1:-1]} & set(spec.joined), (world, bounds)
    with pytest.raises(PlanError, match="at most 5 stages"):
        partition(loads, [RankBudget(device=1 << 30)] * 6)


def test_planner_never_starts_a_stage_at_a_joined_unit():
    """Hand-built units: the balanced split of 6 equal layers on 2 ranks cuts at 3, but
    layer 3 stays with layer 2, so the best allowed split is taken instead."""
    units = [UnitLoad(f"l{i}", 1.0, ((f"w{i}", 10),), with_previous=i in (3, 4)) for i in range(6)]
    assert partition(units, [RankBudget(device=1000)] * 2).bounds == (0, 2, 6)
    free = [UnitLoad(u.name, u.cost, u.items) for u in units]
    assert partition(free, [RankBudget(device=1000)] * 2).bounds == (0, 3, 6)


@pytest.mark.parametrize("change, field", [
    ({"num_kv_shared_layers": 6}, "num_kv_shared_layers"),
    ({"num_kv_shared_layers": 2, "layer_types": [S, S, S, S, F, F], "per_layer_config": None},
     "num_kv_shared_layers"),
    ({"per_layer_config": {"1": {"intermediate_size": 4}}}, "per_layer_config"),
    ({"per_layer_config": {"1": {"head_dim": 32}, "5": {"head_dim": 40}}}, "per_layer_config"),
    ({"per_layer_config": {"9": {"head_dim": 32}}}, "per_layer_config"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "rope_parameters"),
    ({"rope_parameters": {S: {"rope_type": "dynamic", "factor": 2.0}, F: {"rope_type": "default"}}},
     "rope_parameters.sliding_attention"),
    ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 6, "moe_intermediate_size": 8},
     "top_k_experts"),
    ({"enable_moe_block": True, "moe_intermediate_size": 8}, "num_experts"),
    ({"enable_moe_block": "yes"}, "enable_moe_block"),
    ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
    ({"hidden_size_per_layer_input": -1}, "hidden_size_per_layer_input"),
    ({"num_global_key_value_heads": 3, "per_layer_config": None}, "num_key_value_heads"),
    ({"final_logit_softcapping": "big"}, "final_logit_softcapping"),
])
def test_bad_configs_name_the_field(change, field):
    config = {**gemma4_config("gemma4_text").to_dict(), **change}
    if config.get("per_layer_config") is None:
        config.pop("per_layer_config", None)
    with pytest.raises(ValueError, match=field):
        with torch.device("meta"):
            build_model(config)


def test_a_hub_style_config_reads_like_transformers():
    """A config.json as the hub has it (global_head_dim / num_global_key_value_heads, no
    per_layer_config) reads to the shapes transformers builds from it."""
    config = gemma4_config("gemma4_text").to_dict()
    del config["per_layer_config"]
    hub = {**config, "global_head_dim": 40, "num_global_key_value_heads": 1}
    ours = describe_model(_meta_model_of(hub))
    theirs = transformers.Gemma4TextConfig.from_dict(hub)
    assert [u.kv_per_token for u in ours.units if u.name == "model.layers.1"] == \
        [2 * theirs.per_layer_config[1].num_key_value_heads * theirs.per_layer_config[1].head_dim]


def _meta_model_of(config: dict):
    with torch.device("meta"):
        return build_model(config)


def test_config_mutations_raise_only_value_errors():
    """Any JSON value in any key the family reads: read, or refused with a ValueError."""
    base = json.loads(json.dumps(gemma4_config("gemma4_text").to_dict()))
    keys = sorted(k for k, v in base.items() if not isinstance(v, dict)) + [
        "rope_parameters", "per_layer_config", "global_head_dim", "num_global_key_value_heads"]
    check_config_mutations(base, keys, examples=60)


def test_a_multimodal_checkpoint_loads_its_text_part_only(checkpoints, references):
    """The gemma4 hub layout: the text model under its plain names, its logits and greedy
    tokens those of transformers' multimodal model on text; no byte of the vision tower or
    its projector is read."""
    path = checkpoints["gemma4"]
    pipe = distload.load(str(path), device="cpu")
    total = sum(m.stat().st_size for m in path.glob("*.safetensors"))
    assert pipe.module.config.nested_in == "gemma4"
    keys = {p.key for s in pipe.plan.stages for p in s.params}
    assert keys and all(k.startswith(("model.", "lm_head.")) for k in keys)
    assert pipe.report["bytes_read"] == pipe.plan.checkpoint_bytes < total
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = pipe.forward(ids, mask)
        tokens = pipe.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])
    real = mask.bool()
    assert (logits[real] - references["gemma4"][0][real]).abs().max() <= ATOL
    assert torch.equal(tokens, references["gemma4"][1])


def test_continuous_batching_with_shared_kv_and_ple_matches_transformers(checkpoints):
    """The serving scheduler (a world of one) over the first case: requests shorter and
    longer than the window join groups of other lengths (left-padded, stacked, leading
    padding dropped) and leave them, the sharing layers reading their sources' aligned
    caches; every greedy answer is transformers' for it alone."""
    from distload.pipeline.sampling import SamplingConfig
    from distload.serve.scheduler import Scheduler
    from distload.serve.sequence import Sequence

    class NoText:
        def decode(self, ids):
            return ""

    path = checkpoints["gemma4_text"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pipe = distload.load(str(path), device="cpu", max_batch_size=4, max_seq_len=64)
    scheduler = Scheduler(pipe, groups=2, group_size=2, max_queue=100)
    rng = random.Random(5)
    seqs = [Sequence(prompt=[1] + [rng.randrange(3, VOCAB) for _ in range(n - 1)], max_tokens=m,
                     sampling=SamplingConfig(), stop_ids=set(), stop_strings=(), text=NoText(),
                     emit=lambda e: None)
            for n, m in ((9, 8), (2, 10), (5, 3), (3, 9), (12, 6), (7, 9))]

    def arrive():
        for i, seq in enumerate(seqs):
            assert scheduler.submit(seq)
        scheduler.drain(60)

    feeder = threading.Thread(target=arrive)
    feeder.start()
    scheduler.run()
    feeder.join()
    check_greedy_answers(model, seqs)
    assert all(g.used == 0 and not g.cached for g in scheduler.groups)


def test_shared_layers_kv_projections_in_a_checkpoint_are_not_read():
    """Exports that keep the k/v projections and norms of the KV-sharing layers (transformers
    ignores them): distload maps them to nothing, so no rank reads them; the sources' stay."""
    from distload.checkpoint.types import TensorMeta
    from distload.models import config_from_dict
    from distload.models.gemma4 import Gemma4ForCausalLM

    config = config_from_dict(gemma4_config("gemma4_text").to_dict())
    names = [f"model.layers.{i}.self_attn.{p}.weight" for i in (3, 4, 5) for p in ("k_proj", "v_proj", "k_norm")]
    names += ["model.layers.14.self_attn.k_proj.weight", "model.layers.4.self_attn.q_proj.weight"]
    tensors = {n: TensorMeta(n, "a.safetensors", "float32", (2,), 8 * i, 8) for i, n in enumerate(names)}
    kept = set(Gemma4ForCausalLM.checkpoint_tensors(config, tensors))
    assert kept == {n for n in names if not n.startswith(("model.layers.4.self_attn.k", "model.layers.4.self_attn.v",
                                                          "model.layers.5.self_attn.k", "model.layers.5.self_attn.v"))}
