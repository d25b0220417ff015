"""Routers kept in float32 under a bfloat16 load, as transformers keeps them
(`_keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]` of DeepSeek-V3
and GLM-4.5): the correction biases here are 2 + a few thousandths, which bfloat16 (a step
of 1/64 at 2) rounds all to 2, so a router holding them in bfloat16 chooses other experts.
Reference: transformers' `from_pretrained(dtype=torch.bfloat16)` of the same checkpoint —
the same experts chosen from the same inputs, the same float32 weights, logits within
bfloat16's tolerance; and the plan sizes the routers at 4 bytes a value.
"""

from __future__ import annotations

import re

import pytest
import torch

import distload
from distload.models.common.attention import position_ids_from_mask

from .archs import left_padded_batch, save_in_memory_layout
from .archs_frontier import hf_config, hf_model
from .archs_more import more_config

transformers = pytest.importorskip("transformers")

ROUTER = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")


def _checkpoint(config, out, *, in_memory: bool = False):
    """A float32 checkpoint of `config` whose routers' biases bfloat16 cannot tell apart
    (`in_memory`: in transformers' in-memory layout, `tests.archs.save_in_memory_layout`)."""
    model = hf_model(config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if hasattr(gate, "e_score_correction_bias"):
                gate.weight.mul_(0.1)   # scores close enough for the biases' thousandths to decide
                gate.e_score_correction_bias.copy_(2.0 + torch.rand(gate.weight.shape[0], generator=gen) * 7e-3)
    if in_memory:
        return save_in_memory_layout(model, out)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe"])
def test_routers_stay_float32_under_bfloat16_as_in_transformers(name, tmp_path):
    config = hf_config(name) if name == "deepseek_v3" else more_config(name)
    path = _checkpoint(config, tmp_path / name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, experts_implementation="eager").eval()
    pipe = distload.load(str(path), dtype="bfloat16", device="cpu")
    ours = pipe.module

    # The plan holds the routers in float32 and sizes them so; everything else bfloat16.
    params = {p.param: p for s in pipe.plan.stages for p in s.params}
    routers = [n for n in params if ROUTER.search(n)]
    assert routers and all(params[n].dtype == "float32" for n in routers)
    assert all(p.dtype == "bfloat16" for n, p in params.items() if n not in routers)
    one_per_key = {p.key: n for n, p in params.items()}   # a tied head shares its storage
    held = sum(ours.get_parameter(n).numel() * (4 if n in routers else 2) for n in one_per_key.values())
    assert sum(s.param_bytes for s in pipe.plan.stages) == held

    flipped = 0
    x = torch.randn(64, config.hidden_size, generator=torch.Generator().manual_seed(3)).bfloat16()
    for i in range(config.first_k_dense_replace, config.num_hidden_layers):
        gate, their_gate = ours.model.layers[str(i)].mlp.gate, theirs.model.layers[i].mlp.gate
        assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
        assert their_gate.weight.dtype == their_gate.e_score_correction_bias.dtype == torch.float32
        with torch.no_grad():
            weights, chosen = gate(x)
            _, their_weights, their_chosen = their_gate(x)
            order, their_order = chosen.argsort(-1), their_chosen.argsort(-1)
            assert torch.equal(chosen.gather(1, order), their_chosen.gather(1, their_order)), i
            torch.testing.assert_close(weights.gather(1, order), their_weights.gather(1, their_order),
                                       atol=1e-6, rtol=0)
            # the case matters: with the bias rounded to bfloat16 other experts are chosen
            bias = gate.e_score_correction_bias.data.clone()
            gate.e_score_correction_bias.data = bias.bfloat16().float()
            rounded = gate(x)[1]
            gate.e_score_correction_bias.data = bias
        flipped += int((rounded.sort(-1).values != chosen.sort(-1).values).any(-1).sum())
    assert flipped > 0

    ids, mask = left_padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = theirs(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits.float()
        got = pipe.forward(ids, mask).float()
    err = (got[real] - want[real]).abs().max().item()
    assert err <= 0.01 * want[real].abs().max().item(), f"{name}: logits differ by {err:.3f}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss"])
def test_the_float32_parameters_are_transformers(name, dtype):
    """Per family and dtype, the parameters kept in float32 are those transformers' dtype
    plan keeps (`_keep_in_fp32_modules_strict` under bfloat16/float16, `_keep_in_fp32_modules`
    under float16 only), among the names both models share (experts are packed there)."""
    from distload.meta import init_empty_weights
    from distload.models import build_model, family_for

    config = hf_config(name) if name.startswith("deepseek") else more_config(name)
    with init_empty_weights():
        ours = build_model(config.to_dict())
    patterns = [re.compile(p) for p in family_for(config.to_dict()).float32_params(dtype)]
    kept = {n for n, _ in ours.named_parameters() if any(p.search(n) for p in patterns)}
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    plan = theirs._get_dtype_plan(getattr(torch, dtype))
    their_names = {n for n, _ in theirs.named_parameters()} | {n for n, _ in theirs.named_buffers()}
    their_kept = {n for n in their_names if any(re.search(p.replace("*", ".*"), n) for p in plan)}
    shared = their_names & {n for n, _ in ours.named_parameters()}
    assert kept & shared == their_kept & shared
    assert (kept != set()) == (name != "gpt_oss" and dtype != "float32" or name == "gpt_oss" and dtype == "float16")


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe"])
def test_accelerate_workflow_keeps_what_the_model_class_keeps_float32(name, tmp_path):
    """`load_checkpoint_and_dispatch(model, path, dtype=torch.bfloat16)` of a transformers
    model built from its config keeps in float32 what the class declares
    (`_keep_in_fp32_modules_strict`: the router weights, and the correction biases, which
    are buffers there), as transformers' `from_pretrained(dtype=torch.bfloat16)` does:
    every tensor equal to its, dtype included, and the logits. accelerate's own function
    casts those to bfloat16 (checked, so that the difference is deliberate) and gives every
    other tensor as distload does."""
    import accelerate

    from distload import init_empty_weights, load_checkpoint_and_dispatch
    from distload.compat.accelerate.precision import float32_dtypes

    config = hf_config(name) if name == "deepseek_v3" else more_config(name)
    path = _checkpoint(config, tmp_path / name, in_memory=True)   # what a model built from config holds
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, experts_implementation="eager").eval()
    want = theirs.state_dict()
    routers = {n for n in want if ROUTER.search(n)}
    assert routers and any(n.endswith("e_score_correction_bias") for n in routers)

    def meta(init):
        with init():
            return transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")

    # a map planned for bfloat16 ("auto") sizes them as float32
    assert set(float32_dtypes(meta(init_empty_weights), "bfloat16")) == routers
    ours = load_checkpoint_and_dispatch(meta(init_empty_weights), path, device_map={"": "cpu"},
                                        dtype=torch.bfloat16).eval()
    got = ours.state_dict()
    assert got.keys() == want.keys()
    for n, t in want.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    assert all(want[n].dtype == torch.float32 for n in routers)
    ids = torch.tensor([[1, 5, 9, 20, 3, 7], [4, 4, 8, 15, 16, 23]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)

    acc = accelerate.load_checkpoint_and_dispatch(meta(accelerate.init_empty_weights), str(path),
                                                  device_map={"": "cpu"}, dtype=torch.bfloat16)
    for n, t in acc.state_dict().items():
        if n in routers:
            assert t.dtype == torch.bfloat16, n
        else:
            assert torch.equal(t, got[n]), n
