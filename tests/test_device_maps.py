"""Issue 10's cases with real (small, randomly initialised) transformers models: the cpu
budgets accelerate runs, partial device maps, maps for GPUs this machine lacks, the 70B
seed map on meta, `load_checkpoint_in_model` and accelerate's other switches — outputs
against transformers' own `from_pretrained` model wherever a model runs."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig

from distload import (LoadError, PlanError, infer_auto_device_map, init_empty_weights,
                      load_checkpoint_and_dispatch, load_checkpoint_in_model)
from distload.checkpoint.types import TensorMeta
from distload.compat.accelerate import placement
from distload.compat.accelerate.device_map import plan_device_map
from distload.meta import describe_model
from distload.models import build_model
from distload.offload import streamer_of
from distload.plan.budget import LocalMemory, parse_max_memory, resolve_budgets
from distload.plan.planner import plan_model
from distload.plan.reserve import run_shape
from distload.plan.types import Tier

MiB = 2**20
# all-MiniLM-L6-v2's shapes: a 44.7 MiB word embedding, 6.8 MiB layers, 86.6 MiB in float32
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)
# SmolLM2-135M's shapes (a 49152 x 576 tied embedding), fewer layers
SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
BERT_IDS = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0], [101, 2023, 2003, 2062, 1012, 102, 0, 0]])
LLAMA_IDS = torch.tensor([[1, 15, 27, 200, 42, 7], [5, 9, 81, 2, 3, 4]])


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm") / "ckpt"
    torch.manual_seed(0)
    BertModel(BertConfig(**MINILM)).save_pretrained(path)
    with torch.no_grad():
        ref = BertModel.from_pretrained(path).eval()(BERT_IDS, attention_mask=(BERT_IDS > 0).long())
    return path, ref


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    path = tmp_path_factory.mktemp("smol") / "ckpt"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**SMOL), dtype=torch.bfloat16).save_pretrained(path)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()(LLAMA_IDS).logits
    return path, ref


def _bert():
    with init_empty_weights():
        return BertModel(BertConfig(**MINILM))


def _llama():
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(LlamaConfig(**SMOL), dtype=torch.bfloat16)


@torch.no_grad()
def _bert_out(model):
    return model.eval()(BERT_IDS, attention_mask=(BERT_IDS > 0).long())


@pytest.mark.parametrize("mib", [52, 60, 70, 86])
def test_minilm_at_the_cpu_budgets_accelerate_runs(minilm, mib, tmp_path):
    """Below the whole model (86.6 MiB) distload used to refuse every budget: 2 x the
    embedding never fit. Now the embedding stays resident where it and a streamed layer
    fit (52 MiB cannot: 45.5 + 6.8 > 52), and layers stream from disk."""
    path, ref = minilm
    model = _bert()
    plan = plan_device_map(model, {"cpu": f"{mib}MiB"})
    (stage,) = plan.partition.stages
    assert stage.tier_bytes[0] + stage.reserved <= mib * MiB and stage.tier_bytes[2] > 0
    if mib >= 60:
        assert plan.device_map["embeddings"] == "cpu"
    from accelerate import infer_auto_device_map as accelerate_map

    device_map = infer_auto_device_map(model, max_memory={"cpu": f"{mib}MiB"})
    assert device_map == accelerate_map(model, max_memory={"cpu": f"{mib}MiB"})   # one process
    model = load_checkpoint_and_dispatch(model, path, device_map=device_map, offload_folder=tmp_path)
    assert streamer_of(model).max_resident == device_map.stream_slots == 1   # accelerate's room: one layer
    out = _bert_out(model)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.pooler_output, ref.pooler_output)


def test_accelerate_own_map_and_a_map_naming_children_load(minilm, tmp_path):
    from accelerate import infer_auto_device_map as accelerate_map

    path, ref = minilm
    model = _bert()
    theirs = accelerate_map(model, max_memory={"cpu": "52MiB"})     # names sub-layer modules
    model = load_checkpoint_and_dispatch(model, path, device_map=theirs, offload_folder=tmp_path)
    assert torch.equal(_bert_out(model).last_hidden_state, ref.last_hidden_state)
    # `embeddings` itself unnamed: its position_ids / token_type_ids buffers follow it
    children = {f"embeddings.{c}": "cpu" for c in ("word_embeddings", "position_embeddings",
                                                    "token_type_embeddings", "LayerNorm")}
    model = load_checkpoint_and_dispatch(_bert(), path, device_map={**children, "encoder": "disk", "pooler": "cpu"},
                                         offload_folder=tmp_path)
    out = _bert_out(model)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state) and torch.equal(out.pooler_output, ref.pooler_output)


def test_llama_map_without_buffer_modules_and_a_missing_parameter(smol, tmp_path):
    path, ref = smol
    hand = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    model = load_checkpoint_and_dispatch(_llama(), path, device_map=hand, offload_folder=tmp_path)
    with torch.no_grad():
        assert torch.equal(model(LLAMA_IDS).logits, ref)             # no model.rotary_emb in the map
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    with pytest.raises(LoadError, match=r"no device for parameter model\.norm\.weight"):
        load_checkpoint_and_dispatch(_llama(), path, device_map={k: v for k, v in hand.items() if k != "model.norm"})


def test_tied_embedding_stays_resident_and_serves_the_head(smol, tmp_path):
    path, ref = smol
    model = _llama()
    embed = sum(p.numel() * 2 for p in model.model.embed_tokens.parameters())
    layer = sum(p.numel() * 2 for p in model.model.layers[0].parameters())
    budget = embed + 3 * layer          # the embedding, a layer, and two streaming slots
    device_map = infer_auto_device_map(model, max_memory={"cpu": budget}, clean_result=False)
    assert device_map["model.embed_tokens"] == device_map["lm_head"] == "cpu"
    assert "disk" in device_map.values()
    model = load_checkpoint_and_dispatch(model, path, device_map=device_map, offload_folder=tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(LLAMA_IDS).logits, ref)


def test_smollm2_135m_keeps_its_embedding_resident_at_300mb_per_rank():
    """Two CPU ranks of 300 MB (SmolLM2-135M, float32, generation's reserve): rank 0 used to
    put its whole stage on disk (419 MiB streamed per forward)."""
    config = {"model_type": "llama", **SMOL, "num_hidden_layers": 30, "torch_dtype": "float32"}
    with init_empty_weights():
        spec = describe_model(build_model(config))
    tensors, offset = {}, 0
    for p in (p for u in spec.units for p in u.params if p.name != "lm_head.weight"):
        tensors[p.name] = TensorMeta(p.name, "model.safetensors", "float32", p.shape, offset, p.numel * 4)
        offset += p.numel * 4
    budgets = resolve_budgets(parse_max_memory({"cpu": "600MB"}), [LocalMemory("cpu", None, 8 << 30, None, 2)] * 2)
    plan = plan_model(spec, tensors, budgets=budgets, source={"kind": "local", "label": "smol"},
                      format="safetensors", config=config, shape=run_shape(config, workload="generate"))
    first = plan.stages[0]
    assert first.unit_tiers[0] == Tier.DEVICE and first.units[0] == "model.embed_tokens"
    streamed = first.held_bytes[Tier.CPU] + first.held_bytes[Tier.DISK]
    assert streamed < 200 * MiB and first.held_bytes[Tier.DEVICE] > 108 * MiB
    for s in plan.stages:
        assert s.held_bytes[Tier.DEVICE] + s.reserved_bytes <= 300_000_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_gpu_keys_without_gpus_plan_with_a_warning_and_load_fails_before_reading(smol, monkeypatch, caplog):
    path, _ = smol
    model = _llama()
    with caplog.at_level(logging.WARNING, logger="distload"):
        device_map = infer_auto_device_map(model, max_memory={0: "100MB", 1: "100MB", "cpu": "1GB"})
    assert "names GPU(s) 0, 1 but this machine has no CUDA device" in caplog.text
    assert device_map == {"": 0}                     # one process: the first GPU filled first
    import distload.compat.accelerate.dispatch as dispatch

    monkeypatch.setattr(dispatch, "open_source", lambda *a, **k: pytest.fail("read before the device check"))
    with pytest.raises(LoadError, match=r"on 0, but this machine has no CUDA device"):
        load_checkpoint_and_dispatch(model, path, device_map=device_map)
    with pytest.raises(LoadError, match=r"'cuda:1', but this machine has no CUDA device"):
        load_checkpoint_in_model(_llama(), path, device_map={"": "cuda:1"})


def test_load_checkpoint_in_model_has_accelerates_meaning(smol, tmp_path):
    path, ref = smol
    model = _llama()
    assert load_checkpoint_in_model(model, path) is None            # no device_map: the CPU
    with torch.no_grad():
        assert torch.equal(model(LLAMA_IDS).logits, ref)
    model = _llama()
    load_checkpoint_in_model(model, path, device_map={"model.layers.1": "disk", "": "cpu"}, offload_folder=tmp_path)
    assert all(p.is_meta for p in model.model.layers[1].parameters()) and any(tmp_path.rglob("*"))
    with torch.no_grad():
        assert torch.equal(model(LLAMA_IDS).logits, ref)            # streamed in from the store
    model = _llama()
    load_checkpoint_in_model(model, path, dtype=torch.float16, keep_in_fp32_modules=["norm"])
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float16


def test_accelerate_switches_work_or_warn_once(smol, tmp_path, monkeypatch, caplog):
    path, ref = smol
    monkeypatch.setattr(placement, "_SAID", set())
    with caplog.at_level(logging.INFO, logger="distload"):
        for _ in range(2):
            model = load_checkpoint_and_dispatch(_llama(), path, device_map={"": "cpu"}, offload_buffers=True,
                                                 offload_state_dict=True, preload_module_classes=["LlamaDecoderLayer"],
                                                 skip_keys="past_key_values", force_hooks=True)
            with torch.no_grad():
                assert torch.equal(model(LLAMA_IDS).logits, ref)
    assert "offload_buffers" not in caplog.text   # honoured (nothing offloaded here): no warning
    assert "preload_module_classes" not in caplog.text   # honoured (tests/test_preload.py): no warning
    assert caplog.text.count("offload_state_dict: distload builds no temporary state dict") == 1
    assert "peak host memory is the weights placed on 'cpu' (" in caplog.text


def _seed_model():
    config = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_70b_map_keeps_accelerates_order_within_every_budget(dtype):
    """The seed workflow on the meta model: GPUs, then cpu, then disk — no offloaded unit
    between two GPUs — each tier within its budget, the first GPU keeping room to stream."""
    model = _seed_model()
    max_memory = {0: "20GB", 1: "20GB", "cpu": "100GB"}
    plan = plan_device_map(model, max_memory, no_split_module_classes=["LlamaDecoderLayer"], dtype=dtype)
    order = [plan.device_map[u] for u in plan.units]
    rank = {0: 0, 1: 1, "cpu": 2, "disk": 3}
    assert [rank[d] for d in order] == sorted(rank[d] for d in order)
    assert {0, 1, "cpu"} <= set(order) and ("disk" in order or dtype != torch.float32)
    stages = plan.partition.stages
    assert plan.devices == (0, 1, 0) and plan.offloaded
    assert stages[0].tier_bytes[0] + stages[-1].reserved <= 20 * 10**9    # GPU 0 streams the tail
    assert stages[1].tier_bytes[0] <= 20 * 10**9 and stages[-1].tier_bytes[1] <= 100 * 10**9
    # a disk budget is honoured too: what no longer fits is an error naming the budgets
    tight = plan_device_map(model, {**max_memory, "disk": "200GB"}, no_split_module_classes=["LlamaDecoderLayer"],
                            dtype=dtype)
    assert tight.partition.stages[-1].tier_bytes[2] <= 200 * 10**9
    with pytest.raises(PlanError, match="'disk'"):
        plan_device_map(model, {**max_memory, "disk": "10GB"}, no_split_module_classes=["LlamaDecoderLayer"],
                        dtype=torch.float32)


@pytest.mark.parametrize("low_zero", [False, True])
@pytest.mark.parametrize("no_split", [None, ["LlamaDecoderLayer"]])
def test_balanced_memory_and_auto_maps_are_accelerates(low_zero, no_split):
    """device_map="auto"/"balanced*" in one process: accelerate's balanced budgets, then its map."""
    from accelerate import infer_auto_device_map as accelerate_map
    from accelerate.utils import get_balanced_memory as accelerate_balanced

    from distload import get_balanced_memory

    model = _llama()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for budget in ({0: total, 1: total, "cpu": 10 * total}, {0: total // 3, 1: total // 3, 2: total // 3}):
        ours = get_balanced_memory(model, dict(budget), no_split, low_zero=low_zero)
        assert ours == accelerate_balanced(model, dict(budget), no_split, low_zero=low_zero)
        assert infer_auto_device_map(model, ours, no_split) == accelerate_map(model, ours, no_split)
