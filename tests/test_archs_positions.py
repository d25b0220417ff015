"""The families that position tokens without RoPE (GPT-2's and OPT's learned tables,
BLOOM's ALiBi) beyond the shared family checks (`test_archs_fam.py` runs their cases
across 2 and 3 ranks against transformers): ALiBi's slopes, the hub's original file
layouts (GPT-2's and BLOOM's names without ``transformer.``, GPT-2's saved causal masks;
OPT's without ``model.``) through `distload.load` and the accelerate
workflow (whose checkpoint names are matched through ``base_model_prefix`` both ways, as
`from_pretrained` matches them), and calls longer than the position table, refused
before they start.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from distload.models.common.attention import position_ids_from_mask

from .archs import left_padded_batch
from .archs_fam import fam_config

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    """(directory, transformers' model): a GPT-2 saved as the hub's ``gpt2`` files are:
    names without ``transformer.``, no ``lm_head.weight`` (tied), and every layer's
    ``attn.bias`` (the causal mask) and ``attn.masked_bias``."""
    model, tensors = _perturbed(transformers.GPT2LMHeadModel, "gpt2", strip="transformer.")
    positions = model.config.n_positions
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.uint8))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return _save(tmp_path_factory.mktemp("gpt2_hub"), tensors, model), model


def _perturbed(cls, case: str, *, strip: str) -> tuple:
    """(transformers' `cls` of the family case `case`, every parameter perturbed; its
    tensors named without `strip` and without the tied head)."""
    torch.manual_seed(0)
    model = cls(fam_config(case)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tensors = {k.removeprefix(strip): v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    return model, tensors


def _save(out, tensors: dict, model):
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config.to_dict()))
    return out


def test_the_hubs_layout_loads_without_reading_the_saved_masks(hub_layout):
    import distload

    path, model = hub_layout
    pipe = distload.load(str(path), device="cpu")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        got = pipe.forward(ids, mask)
        want = transformers.GPT2LMHeadModel.from_pretrained(path).eval()(
            ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 1e-5
    # the weights' bytes, not the masks' (4 KB a layer here, 4 MB in GPT-2 small)
    weights = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k != "lm_head.weight")
    assert pipe.report["bytes_read"] == weights


def test_the_accelerate_workflow_loads_the_hubs_layout(hub_layout):
    from distload import init_empty_weights, load_checkpoint_and_dispatch

    path, model = hub_layout
    with init_empty_weights():
        empty = transformers.GPT2LMHeadModel(model.config)
    loaded = load_checkpoint_and_dispatch(empty, str(path), device_map="auto",
                                          no_split_module_classes=["GPT2Block"]).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_calls_longer_than_the_position_table_are_refused_before_they_start(hub_layout):
    import distload

    path, model = hub_layout
    pipe = distload.load(str(path), device="cpu")
    positions = model.config.n_positions
    assert pipe.max_positions == positions
    too_long = torch.randint(3, 100, (2, positions + 1))
    with pytest.raises(ValueError, match=rf"{positions + 1} positions; this model has {positions} .*n_positions"):
        pipe.forward(too_long)
    with pytest.raises(ValueError, match=rf"{positions + 3} positions; this model has {positions}"):
        pipe.generate(too_long[:, :positions - 2], max_new_tokens=5)
    # the pipeline is still usable, and a call that fits runs to the table's end
    out = pipe.generate(too_long[:, :positions - 5], max_new_tokens=5, eos_token_id=[])
    assert out.shape == (2, positions)


def test_a_full_models_checkpoint_loads_into_its_base_model(hub_layout, tmp_path):
    """The other way round: ``transformer.``-prefixed names (what `save_pretrained` writes
    for the model with its head) into `GPT2Model`, as `from_pretrained` reads them."""
    from distload import init_empty_weights, load_checkpoint_and_dispatch

    _, model = hub_layout
    model.save_pretrained(tmp_path)
    with init_empty_weights():
        empty = transformers.GPT2Model(model.config)
    loaded = load_checkpoint_and_dispatch(empty, str(tmp_path), device_map={"": "cpu"}).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want = transformers.GPT2Model.from_pretrained(tmp_path).eval()(ids, attention_mask=mask)
        assert torch.equal(loaded(ids, attention_mask=mask).last_hidden_state, want.last_hidden_state)


@pytest.fixture(scope="module")
def opt_hub_layout(tmp_path_factory):
    """(directory, transformers' model): an OPT-350M-shaped model (post-norm, projected
    embeddings) saved under ``decoder.`` names, as OPT's first hub files are, without the
    tied head."""
    model, tensors = _perturbed(transformers.OPTForCausalLM, "opt_post", strip="model.")
    return _save(tmp_path_factory.mktemp("opt_hub"), tensors, model), model


def test_opts_hub_layout_loads_through_both_paths(opt_hub_layout):
    import distload
    from distload import init_empty_weights, load_checkpoint_and_dispatch

    path, model = opt_hub_layout
    ids, mask = left_padded_batch()
    positions = position_ids_from_mask(mask)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=positions).logits
        got = distload.load(str(path), device="cpu").forward(ids, mask)
        with init_empty_weights():
            empty = transformers.OPTForCausalLM(model.config)
        loaded = load_checkpoint_and_dispatch(empty, str(path), device_map="auto").eval()
        assert torch.equal(loaded(ids, attention_mask=mask, position_ids=positions).logits, want)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 1e-5


@pytest.mark.parametrize("heads", [1, 2, 3, 6, 8, 12, 16, 40, 112])
def test_alibi_slopes_are_transformers(heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    from distload.models.bloom import alibi_slopes

    assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")).float())


def test_blooms_hub_layout_loads_through_both_paths(tmp_path):
    """BLOOM's hub files name its tensors without ``transformer.`` (and leave out the tied
    head); ALiBi's positions count real tokens past the left padding."""
    import distload
    from distload import init_empty_weights, load_checkpoint_and_dispatch

    model, tensors = _perturbed(transformers.BloomForCausalLM, "bloom", strip="transformer.")
    path = _save(tmp_path, tensors, model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = distload.load(str(path), device="cpu").forward(ids, mask)
        with init_empty_weights():
            empty = transformers.BloomForCausalLM(model.config)
        loaded = load_checkpoint_and_dispatch(empty, str(path), device_map="auto").eval()
        assert torch.equal(loaded(ids, attention_mask=mask).logits, want)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 1e-5
