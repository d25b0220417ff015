"""The frontier architectures (DeepSeek-V2 and V3) against transformers, the independent
reference, as `test_archs.py` does for the others: checkpoints transformers writes itself
(`save_pretrained`, >= 2 shards, awkward sizes), their packed-expert layout, an FP8
copy (block scales, every matrix with a clipped last block) whose reference is
transformers loading the same weights decoded value by value (`tests.quant_ckpt`), and a
gpt-oss with MXFP4 experts (the published ``_blocks`` / ``_scales``; 2 ranks) whose
reference is transformers' own dequantization (`Mxfp4Config(dequantize=True)`) —
loaded on 2 ranks (each type and the FP8 copy on 3 too; one launch per world size): logits of a
left-padded batch within 1e-4 (float32), greedy `generate` identical for 12 tokens, the
ranks' bytes summing to the checkpoint's (the quantized ones': their quantized bytes and scales),
and one MoE with layers on the disk tier, plain and FP8. In one process: MLA's KV reserve
is the latent, MTP layers are not read, config errors name the field.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from distload.meta import describe_model, init_empty_weights
from distload.models import build_model, supported_model_types

from .arch_checks import check_config_mutations, check_outputs, reference_outputs, run_pipelines
from .archs import repack_experts
from .archs import make_hf_checkpoint as make_any_checkpoint
from .archs_frontier import ARCHS, FP8_BLOCK, hf_config, make_hf_checkpoint
from .archs_more import more_config
from .quant_ckpt import quantize_checkpoint_fp8, quantize_checkpoint_mxfp4

transformers = pytest.importorskip("transformers")

FP8 = "deepseek_v3_fp8"
MXFP4 = "gpt_oss_mxfp4"
QUANTIZED = (FP8, MXFP4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory: every case, `deepseek_v3_packed`, `deepseek_v3_fp8` (with its
    decoded twin under `deepseek_v3_fp8_ref`) and `gpt_oss_mxfp4`."""
    root = tmp_path_factory.mktemp("frontier")
    out = {name: make_hf_checkpoint(name, root / name) for name in ARCHS}
    out["deepseek_v3_packed"] = repack_experts(out["deepseek_v3"], root / "deepseek_v3_packed")
    out[FP8] = quantize_checkpoint_fp8(out["deepseek_v3"], root / FP8, root / f"{FP8}_ref", FP8_BLOCK)
    gpt_oss = more_config("gpt_oss")
    gpt_oss.intermediate_size = 96    # MXFP4 groups 32 values along each expert's input side
    out[MXFP4] = quantize_checkpoint_mxfp4(make_any_checkpoint("gpt_oss", root / "gpt_oss", gpt_oss), root / MXFP4)
    return out


def _reference(name: str, checkpoints):
    path = checkpoints[name]
    if name == FP8:
        path = path.parent / f"{FP8}_ref"
    elif name.endswith("_packed"):
        path = checkpoints[name.removesuffix("_packed")]
    kw = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if name == MXFP4 else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation="eager", **kw).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def references(checkpoints):
    """name -> (logits, greedy tokens) of transformers on the left-padded batch."""
    return {name: reference_outputs(_reference(name, checkpoints)) for name in (*ARCHS, *QUANTIZED)}


def test_every_frontier_type_has_a_case():
    frontier = {"deepseek_v2", "deepseek_v3"}
    assert frontier <= set(supported_model_types())
    assert frontier == {c["model_type"] for c in ARCHS.values()}


@pytest.mark.parametrize("world", [2, 3])
def test_frontier_architectures_across_ranks_match_transformers(world, checkpoints, references, tmp_path):
    # Every case on 2 ranks (and the disk tier); each type and the FP8 copy on 3.
    names = sorted(checkpoints) if world == 2 else ["deepseek_v2", "deepseek_v3", FP8]
    disk = ["deepseek_v3_packed", FP8] if world == 2 else []
    results = run_pipelines(world, tmp_path, [checkpoints[n] for n in names],
                            disk=[checkpoints[n] for n in disk], dtype="float32")
    for name in names + [f"{n}@disk" for n in disk]:
        got = results[name]
        on_disk = check_outputs(name, got, references, world)
        ranks = got["job_report"]["ranks"]
        assert (on_disk > 0) == name.endswith("@disk"), name
        read = sum(r["bytes_read"] for r in ranks)
        # Disk-tier weights are references into the checkpoint's files, read when their
        # layer runs — but a decoded one (FP8), which is read with the rest of its rank's
        # weights, decoded, and written to the offload store.
        plain_on_disk = got["plain_on_disk"]
        assert read + plain_on_disk == got["checkpoint_bytes"], name
        if name.startswith(QUANTIZED):
            # Each rank decodes only its own weights, from their quantized bytes and scales.
            files = sum(p.stat().st_size for p in checkpoints[name.split("@")[0]].glob("*.safetensors"))
            assert got["checkpoint_bytes"] < files and all(got["decoded"]), name
            assert (on_disk > plain_on_disk) == name.endswith("@disk"), name
        else:
            assert not any(got["decoded"]) and on_disk == plain_on_disk, name
    if world == 2:
        assert results["deepseek_v3"]["checkpoint_bytes"] == results["deepseek_v3_packed"]["checkpoint_bytes"]


def test_mla_reserves_the_latent_not_per_head_kv():
    """The planner's KV figure for an MLA layer is ``kv_lora_rank + qk_rope_head_dim`` per
    token, what transformers' cache keeps too, not ``2 * heads * head_dim``."""
    from transformers import DynamicCache

    config = hf_config("deepseek_v3")
    with init_empty_weights():
        model = build_model(config.to_dict())
    units = {u.name: u for u in describe_model(model).units}
    want = config.kv_lora_rank + config.qk_rope_head_dim
    assert units["model.layers.0"].kv_per_token == want
    theirs = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    cache = DynamicCache(config=config)
    with torch.no_grad():
        theirs(torch.tensor([[5, 6, 7]]), cache=cache, use_cache=True)
    k, v = cache.layers[0].keys, cache.layers[0].values
    assert k.shape[-1] + v.shape[-1] == want and k.shape[1] == v.shape[1] == 1


def test_mtp_layers_of_the_hub_checkpoints_are_not_read(checkpoints, tmp_path):
    """The hub's DeepSeek-V3 checkpoints append `model.layers.61` (multi-token prediction),
    which the model does not run: no rank reads it, the checkpoint's bytes leave it out."""
    import shutil

    from safetensors.torch import save_file

    import distload

    src = checkpoints["deepseek_v3"]
    dst = tmp_path / "with_mtp"
    shutil.copytree(src, dst)
    layers = hf_config("deepseek_v3").num_hidden_layers
    extra = {f"model.layers.{layers}.eh_proj.weight": torch.ones(56, 112),
             f"model.layers.{layers}.enorm.weight": torch.ones(56)}
    save_file(extra, dst / "mtp.safetensors")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "mtp.safetensors" for k in extra})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    pipe = distload.load(str(dst), device="cpu")
    plain = distload.load(str(src), device="cpu")
    assert pipe.plan.checkpoint_bytes == plain.plan.checkpoint_bytes == pipe.report["bytes_read"]


@pytest.mark.parametrize("name, change, field", [
    ("deepseek_v3", {"n_group": 3}, "n_group"),
    ("deepseek_v3", {"topk_group": 5}, "topk_group"),
    ("deepseek_v3", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("deepseek_v3", {"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ("deepseek_v3", {"kv_lora_rank": 0}, "kv_lora_rank"),
    ("deepseek_v3", {"rope_interleave": "yes"}, "rope_interleave"),
    ("deepseek_v2", {"topk_method": "sinkhorn"}, "topk_method"),
    ("deepseek_v2", {"routed_scaling_factor": -1}, "routed_scaling_factor"),
    ("deepseek_v2", {"q_lora_rank": 0}, "q_lora_rank"),
])
def test_bad_configs_name_the_field(name, change, field):
    config = {**hf_config(name).to_dict(), **change}
    with pytest.raises(ValueError, match=field):
        with torch.device("meta"):
            build_model(config)


def _real_v3() -> dict:
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parent.parent / "scripts" / "configs" /
                       "deepseek-v3.json").read_text())


def test_deepseek_v3_real_config_sizes():
    """DeepSeek-V3's own config.json: 671.0 B parameters; an MoE layer 11.5 B of which 8 of
    256 experts run; 576 cache elements per token and layer (the latent and the rotated
    shared key). Counted by hand: attention q_a 7168*1536 + 1536 + q_b 1536*128*192 +
    kv_a 7168*576 + 512 + kv_b 512*128*256 + o 128*128*7168; router 256*7168 + 256;
    experts 256*3*7168*2048; shared 3*7168*2048; 2 norms."""
    with init_empty_weights(include_buffers=False):   # 3 dense layers and the first MoE one
        model = build_model({**_real_v3(), "num_hidden_layers": 4})
    attn = 7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168
    moe = 256 * 7168 + 256 + 256 * 3 * 7168 * 2048 + 3 * 7168 * 2048
    dense = 3 * 7168 * 18432
    units = {u.name: u for u in describe_model(model).units}
    assert sum(p.numel for p in units["model.layers.3"].params) == attn + moe + 2 * 7168
    assert sum(p.numel for p in units["model.layers.0"].params) == attn + dense + 2 * 7168
    total = sum(p.numel() for p in model.parameters()) + 57 * sum(p.numel for p in units["model.layers.3"].params)
    assert total == 3 * (attn + dense + 2 * 7168) + 58 * (attn + moe + 2 * 7168) + 2 * 129280 * 7168 + 7168
    assert round(total / 1e9, 1) == 671.0
    assert units["model.layers.3"].kv_per_token == 576
    # per token: 2 FLOPs per attention weight, the router, 8 routed experts and the shared one
    assert units["model.layers.3"].cost == 2 * (attn - 1536 - 512) + 2 * 256 * 7168 + 2 * 9 * 3 * 7168 * 2048


def test_a_headers_only_fp8_deepseek_v3_plans_quantized_reads(tmp_path):
    """`make_checkpoint.py --headers-only` of the real config (4 layers) writes DeepSeek-V3's
    FP8 layout — e4m3 matrices, a float32 scale per 128 x 128 block, clipped: the 576-row
    kv_a_proj_with_mqa has a 5 x 56 grid — and the plan reads those bytes and sizes the
    stages decoded (bfloat16)."""
    import importlib.util
    from pathlib import Path

    from distload.checkpoint import index_checkpoint
    from distload.loader.prepare import PlanRequest, plan_load

    spec = importlib.util.spec_from_file_location(
        "make_checkpoint", Path(__file__).resolve().parent.parent / "scripts" / "make_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.write_headers_only({**_real_v3(), "num_hidden_layers": 4}, tmp_path / "v3", num_shards=5,
                                    dtype="bfloat16")
    index = index_checkpoint(out)
    kv_a = "model.layers.3.self_attn.kv_a_proj_with_mqa.weight"
    assert index.tensors[kv_a].dtype == "float8_e4m3fn" and index.tensors[kv_a].shape == (576, 7168)
    assert index.tensors[kv_a + "_scale_inv"].shape == (5, 56)
    plan = plan_load(PlanRequest(model=str(out), world_size=2, max_memory={0: 40 << 30, 1: 40 << 30}))
    assert plan.dtype == "bfloat16"
    assert sum(s.tensor_bytes for s in plan.stages) == plan.checkpoint_bytes == index.tensor_bytes
    decoded = {k for s in plan.stages for k in s.decode}
    assert kv_a in decoded and "model.layers.3.mlp.experts.255.down_proj.weight" in decoded
    assert "model.layers.3.mlp.gate.weight" not in decoded
    # an fp8 matrix is 1 byte per weight (and its scales) read, 2 held; the routers (their
    # weight and correction bias) 4 held, kept in float32 as transformers keeps them; the rest 2
    held = sum(s.param_bytes for s in plan.stages)
    router = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")
    assert held == sum(m.numel * (4 if router.search(n) else 2) for n, m in index.tensors.items()
                       if not n.endswith("_scale_inv"))
    assert {p.dtype for s in plan.stages for p in s.params if router.search(p.param)} == {"float32"}
    assert held > 1.7 * plan.checkpoint_bytes


def test_an_mxfp4_gpt_oss_plans_quantized_reads(checkpoints):
    """The MXFP4 gpt-oss: the ranks read the blocks and scales (the checkpoint's tensor
    bytes, summed), hold the experts decoded (bfloat16 by default: 2 bytes a value where
    half a byte and a scale per 32 were read), and nothing else is decoded."""
    from distload.checkpoint import index_checkpoint
    from distload.loader.prepare import PlanRequest, plan_load

    index = index_checkpoint(checkpoints[MXFP4])
    plan = plan_load(PlanRequest(model=str(checkpoints[MXFP4]), world_size=2))
    assert plan.dtype == "bfloat16"
    assert sum(s.tensor_bytes for s in plan.stages) == plan.checkpoint_bytes == index.tensor_bytes
    decoded = {k for s in plan.stages for k in s.decode}
    assert decoded == {k.removesuffix("_blocks") for k in index.tensors if k.endswith("_blocks")}
    quantized = sum(index.tensors[k + part].length for k in decoded for part in ("_blocks", "_scales"))
    values = sum(index.tensors[k + "_blocks"].numel * 2 for k in decoded)   # two values a byte
    plain = sum(index.tensors[k].numel * 2 for k in index.tensors if not k.endswith(("_blocks", "_scales")))
    assert sum(s.param_bytes for s in plan.stages) == values * 2 + plain
    assert values * 2 > 3.5 * quantized


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2"])
def test_config_mutations_raise_only_value_errors(name):
    """Any JSON value in any key a DeepSeek config reads: it reads or is refused with a
    ValueError (one line naming config.json, from the loader), never another exception."""
    base = hf_config(name).to_dict()
    keys = sorted(k for k, v in base.items() if not isinstance(v, dict)) + ["rope_scaling", "rope_parameters"]
    check_config_mutations(base, keys, examples=40)
