"""Quantized checkpoints, decoded on load (`distload.checkpoint.quant`, `.dequant`,
`distload.loader.decode`) against transformers' own dequantization and against values
decoded one block at a time (`tests.quant_ckpt`): FP8 e4m3 with block scales — a clipped
last block where a side is not a multiple of the block, which transformers 5.25 gets
wrong — and MXFP4 (gpt-oss's experts); the plan reads quantized bytes and sizes stages by
decoded ones; any other format is refused by name, on every rank, before a tensor is read.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import distload
from distload.checkpoint import index_checkpoint
from distload.checkpoint.dequant import fp8_decode, mxfp4_decode
from distload.checkpoint.quant import decoded_view, quant_scheme
from distload.cli.exits import ERROR
from distload.errors import CheckpointError, ConfigError, UsageError
from distload.io import PosixReader
from distload.loader.decode import read_decoded
from distload.loader.prepare import PlanRequest, plan_load
from distload.plan.explain import explain_plan

from .mp import Ranks, worker
from .quant_ckpt import fp8_quantize, fp8_reference, mxfp4_quantize, mxfp4_reference, quantize_checkpoint_fp8

transformers = pytest.importorskip("transformers")
from transformers.integrations.finegrained_fp8 import Fp8Dequantize  # noqa: E402
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

UNKNOWN = ["gptq", "awq", "bitsandbytes", "compressed-tensors", "hqq", None]


def _hf_fp8_decode(q, s, dtype):
    return Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_blocks_equal_transformers_where_the_block_divides(dtype):
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(0)) * 3
    q, s = fp8_quantize(w, (128, 128))
    ours = fp8_decode(q, s, (128, 128), dtype)
    assert torch.equal(ours, _hf_fp8_decode(q, s, dtype))
    assert torch.equal(ours, fp8_reference(q, s, (128, 128)).to(dtype))


def test_fp8_clipped_last_block_uses_the_configured_block():
    """DeepSeek-V3's kv_a_proj_with_mqa: 576 x 7168 in blocks of 128 (4.5 blocks of rows,
    a scale grid of 5 x 56). distload scales each row by its own block's scale; transformers
    5.25 derives the block from the grid: it raises here, and where the grid happens to
    divide the weight (192 rows, 2 blocks of 128: it takes 96) it scales the wrong rows."""
    gen = torch.Generator().manual_seed(1)
    q, s = fp8_quantize(torch.randn(576, 7168, generator=gen), (128, 128))
    assert s.shape == (5, 56)
    assert torch.equal(fp8_decode(q, s, (128, 128), torch.float32), fp8_reference(q, s, (128, 128)))
    with pytest.raises(ValueError, match="not divisible"):
        _hf_fp8_decode(q, s, torch.float32)
    q, s = fp8_quantize(torch.randn(192, 256, generator=gen) * torch.arange(1, 193)[:, None], (128, 128))
    ours, want = fp8_decode(q, s, (128, 128), torch.float32), fp8_reference(q, s, (128, 128))
    assert torch.equal(ours, want)
    assert not torch.equal(_hf_fp8_decode(q, s, torch.float32), want)


def _deepseek_v3(tmp_path, block=(8, 8)):
    """A tiny DeepSeek-V3 whose every matrix is a multiple of `block` (where transformers'
    FP8 decoding is right), in FP8 (and its decoded twin)."""
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=88, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=24, first_k_dense_replace=1,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    return quantize_checkpoint_fp8(tmp_path / "src", tmp_path / "fp8", tmp_path / "ref", block)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    return _deepseek_v3(tmp_path_factory.mktemp("fp8"))


def test_an_fp8_checkpoint_loads_the_tensors_transformers_decodes(fp8_ckpt):
    """Every parameter equals transformers' `FineGrainedFP8Config(dequantize=True)` load of
    the same checkpoint (float32); with no dtype the decoded weights are bfloat16, equal to
    transformers' bfloat16 decoding of them."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        fp8_ckpt, dtype=torch.float32, experts_implementation="eager",
        quantization_config=transformers.FineGrainedFP8Config(weight_block_size=(8, 8), dequantize=True))
    want = theirs.state_dict()
    pipe = distload.load(str(fp8_ckpt), device="cpu", dtype="float32")
    ours = {k: v for k, v in pipe.module.state_dict().items()}
    experts = [k for k in ours if ".experts." in k]
    assert experts and pipe.plan.stages[0].decode
    for key, value in ours.items():
        layer, _, rest = key.partition(".experts.")
        if rest:   # transformers packs its experts: expert e's rows of gate_up_proj / down_proj
            e, name = int(rest.split(".")[0]), rest.split(".")[1]
            packed = want[f"{layer}.experts.{'down_proj' if name == 'down_proj' else 'gate_up_proj'}"][e]
            rows = value.shape[0]
            ref = packed if name == "down_proj" else packed[:rows] if name == "gate_proj" else packed[rows:]
        else:
            ref = want[key]
        assert torch.equal(value, ref), key
    bf16 = distload.load(str(fp8_ckpt), device="cpu")
    assert bf16.plan.dtype == "bfloat16"
    for key in bf16.plan.stages[0].decode:
        assert bf16.module.get_parameter(key).dtype == torch.bfloat16
        assert torch.equal(bf16.module.get_parameter(key), pipe.module.get_parameter(key).to(torch.bfloat16)), key


def test_the_plan_reads_quantized_bytes_and_sizes_stages_decoded(fp8_ckpt):
    plan = plan_load(PlanRequest(model=str(fp8_ckpt), world_size=2))
    index = index_checkpoint(fp8_ckpt)
    assert sum(s.tensor_bytes for s in plan.stages) == plan.checkpoint_bytes == index.tensor_bytes
    reads = [m.name for s in plan.stages for m in s.reads]
    assert sorted(reads) == sorted(index.tensors)          # each tensor read once, by one rank
    for s in plan.stages:
        mine = {m.name for m in s.reads}
        for key, d in s.decode.items():
            assert d["method"] == "fp8" and d["parts"] == [key, key + "_scale_inv"]
            assert set(d["parts"]) <= mine                  # its scales come with the weight
        # bfloat16 on the device, but the routers: float32, as transformers keeps them
        size = {p.key: 4 if p.dtype == "float32" else 2 for p in s.params}
        assert {p.param for p in s.params if p.dtype == "float32"} == \
            {p.param for p in s.params if re.search(r"\.mlp\.gate\.(weight|e_score_correction_bias)$", p.param)}
        decoded = sum(index.tensors[k].numel * n for k, n in size.items())
        assert s.param_bytes == decoded > s.tensor_bytes
    text = explain_plan(plan)
    assert "quantized checkpoint (fp8)" in text and " read " in text


def test_mxfp4_experts_equal_transformers_dequantization(tmp_path):
    """A tiny gpt-oss with its experts in MXFP4 (the published layout): each rank's read of
    blocks and scales decodes to exactly what transformers' `Mxfp4Config(dequantize=True)`
    loads, and to the values decoded one by one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    (tmp_path / "q").mkdir()
    out, want = {}, {}
    with safe_open(tmp_path / "src" / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = mxfp4_quantize(t.transpose(1, 2).contiguous())
                out[key + "_blocks"], out[key + "_scales"] = blocks, scales
                want[key] = mxfp4_reference(blocks, scales)
            else:
                out[key] = t
    save_file(out, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", dtype=torch.bfloat16,
        quantization_config=transformers.Mxfp4Config(dequantize=True)).state_dict()
    index = index_checkpoint(tmp_path / "q")
    view, encoded = decoded_view(index.tensors, quant_scheme(index.config))
    assert set(encoded) == set(want) and all(view[k].shape == want[k].shape for k in want)
    assert sum(m.length for m in view.values()) == index.tensor_bytes
    for dtype in (torch.bfloat16, torch.float32):
        storage = {k: torch.empty(e.shape, dtype=dtype) for k, e in encoded.items()}
        parts = [p.located(index.root) for e in encoded.values() for p in e.parts]
        stats = read_decoded(parts, storage, {k: e.as_dict() for k, e in encoded.items()},
                             reader=PosixReader(index.root))
        assert stats.bytes_read == sum(p.length for p in parts)
        for key, value in storage.items():
            assert torch.equal(value, want[key].to(dtype)), key
            blocks, scales = (out[p.name] for p in encoded[key].parts)
            assert torch.equal(value, convert_moe_packed_tensors(blocks, scales, dtype=dtype)), key
            if dtype == torch.bfloat16:
                assert torch.equal(value, theirs[key]), key
    assert torch.equal(mxfp4_decode(*(out[p.name] for p in encoded[key].parts), torch.float32),
                       want[key])


@pytest.mark.parametrize("method", UNKNOWN)
def test_unknown_quantization_is_refused_by_name(method):
    with pytest.raises(ValueError, match=rf"quant_method {method!r} is not supported.*fp8, mxfp4"):
        quant_scheme({"quantization_config": {"quant_method": method, "bits": 4}})


def _edited(src, dst, config=None, drop=None, replace=None):
    """A copy of checkpoint `src` with config.json keys changed and tensors dropped or replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(src / shard, framework="pt") as f:
            tensors = {k: (replace or {}).get(k, f.get_tensor(k)) for k in f.keys() if k != drop}
        save_file(tensors, dst / shard, metadata={"format": "pt"})
    index["weight_map"].pop(drop, None)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_a_quantized_checkpoint_with_a_bad_part_names_the_tensor(fp8_ckpt, tmp_path):
    key = "model.layers.1.self_attn.o_proj.weight"
    missing = _edited(fp8_ckpt, tmp_path / "missing", drop=key + "_scale_inv")
    with pytest.raises(CheckpointError, match=rf"{key} has no {key}_scale_inv"):
        plan_load(PlanRequest(model=str(missing)))
    shaped = _edited(fp8_ckpt, tmp_path / "shaped", replace={key + "_scale_inv": torch.ones(3, 8)})
    with pytest.raises(CheckpointError, match=rf"{key}_scale_inv has shape \[3, 8\].*needs \[8, 8\]"):
        plan_load(PlanRequest(model=str(shaped)))
    with pytest.raises(UsageError, match="float8_e4m3fn cannot hold"):
        plan_load(PlanRequest(model=str(fp8_ckpt), dtype="float8_e4m3fn"))
    block = _edited(fp8_ckpt, tmp_path / "block", config={"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [8]}})
    with pytest.raises(ConfigError, match="weight_block_size must be two positive integers"):
        plan_load(PlanRequest(model=str(block)))


def test_unknown_quantization_stops_every_rank_with_one_line(tiny_ckpt, tmp_path):
    """A GPTQ checkpoint under the CLI: every rank ends with one line naming quant_method
    and the config file, exit code 1, no traceback."""
    gptq = tmp_path / "gptq"
    shutil.copytree(tiny_ckpt, gptq)
    cfg = json.loads((gptq / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(cfg))
    argv = [worker("cli_slowed.py"), "--device", "cpu", "--model", str(gptq)]
    job = Ranks([argv, argv], tmp_path)
    assert job.wait(90) == [ERROR, ERROR]
    for rank in (0, 1):
        err = job.stderr(rank)
        assert "Traceback" not in err, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"[rank {rank}] ERROR") and "quant_method 'gptq' is not supported" in last
        assert "config.json" in last


def test_accelerates_workflow_refuses_a_quantized_checkpoint(fp8_ckpt):
    """accelerate's workflow reads plain tensors: an FP8 checkpoint would fill the model
    with undecoded values, so it is refused with the way to load it."""
    from distload import init_empty_weights, load_checkpoint_and_dispatch
    from distload.errors import LoadError
    from distload.models import build_model

    with init_empty_weights():
        model = build_model(json.loads((fp8_ckpt / "config.json").read_text()))
    with pytest.raises(LoadError, match=r"fp8 checkpoint is decoded by distload.load"):
        load_checkpoint_and_dispatch(model, str(fp8_ckpt), device_map={"": "cpu"})


def test_decoded_view_keeps_exact_byte_ranges():
    """Hand-built metadata: an fp8 weight and its scales become one tensor under the
    weight's name, decoded shape and dtype, whose parts are exactly the two byte ranges
    (so a plan reads them, and nothing else); MXFP4 blocks + scales likewise, transposed
    as transformers lays gpt-oss's experts out; plain tensors pass through."""
    from distload.checkpoint.quant import QuantScheme
    from distload.checkpoint.types import TensorMeta

    w = TensorMeta("l.0.kv.weight", "a.safetensors", "float8_e4m3fn", (576, 7168), 1000, 576 * 7168)
    s = TensorMeta("l.0.kv.weight_scale_inv", "b.safetensors", "float32", (5, 56), 8, 5 * 56 * 4)
    n = TensorMeta("l.0.norm.weight", "a.safetensors", "bfloat16", (7168,), 9, 7168 * 2)
    view, enc = decoded_view({m.name: m for m in (w, s, n)}, QuantScheme("fp8", (128, 128)))
    assert sorted(view) == ["l.0.kv.weight", "l.0.norm.weight"] and view["l.0.norm.weight"] == n
    kv = view["l.0.kv.weight"]
    assert (kv.dtype, kv.shape, kv.length) == ("bfloat16", (576, 7168), w.length + s.length)
    assert enc["l.0.kv.weight"].parts == (w, s) and enc["l.0.kv.weight"].as_dict() == {
        "method": "fp8", "parts": [w.name, s.name], "block": [128, 128]}
    b = TensorMeta("e.gate_up_proj_blocks", "a.safetensors", "uint8", (4, 64, 2, 16), 0, 4 * 64 * 32)
    sc = TensorMeta("e.gate_up_proj_scales", "a.safetensors", "uint8", (4, 64, 2), 8192, 4 * 64 * 2)
    view, enc = decoded_view({b.name: b, sc.name: sc}, QuantScheme("mxfp4"))
    assert list(view) == ["e.gate_up_proj"] and view["e.gate_up_proj"].shape == (4, 64, 64)
    assert enc["e.gate_up_proj"].parts == (b, sc)
    with pytest.raises(ValueError, match=r"e.gate_up_proj_blocks has no e.gate_up_proj_scales"):
        decoded_view({b.name: b}, QuantScheme("mxfp4"))


def test_a_disk_tier_weight_is_decoded_once_when_its_entry_is_made(fp8_ckpt):
    """`DecodedOnDemand`: asking whether it holds a key reads nothing; each key asked for is
    read (its parts' bytes) and decoded, one at a time."""
    from distload.loader.decode import DecodedOnDemand

    index = index_checkpoint(fp8_ckpt)
    _, encoded = decoded_view(index.tensors, quant_scheme(index.config))
    key = "model.layers.1.self_attn.o_proj.weight"
    metas = {p.name: p.located(index.root) for p in encoded[key].parts}
    lazy = DecodedOnDemand({}, {key: (encoded[key].shape, "float32")}, {key: encoded[key].as_dict()}, metas,
                           reader=PosixReader(index.root))
    assert key in lazy and "other" not in lazy and lazy.bytes_read == 0 and list(lazy) == [key]
    w, s = (p for p in encoded[key].parts)
    from safetensors import safe_open
    with safe_open(index.path(w.file), framework="pt") as f:
        q = f.get_tensor(w.name)
    with safe_open(index.path(s.file), framework="pt") as f:
        scale = f.get_tensor(s.name)
    assert torch.equal(lazy[key], fp8_reference(q, scale, (8, 8)))
    assert lazy.bytes_read == w.length + s.length
