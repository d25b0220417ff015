"""Config validation keeps up with transformers: the default config of every registered
`model_type`, as transformers' own config class writes it, reads without error — a field a
family does not read is never an error (Qwen2-MoE's ``sliding_window: 0`` beside
``use_sliding_window: false``; MLA's ``num_key_value_heads``) — except where transformers'
own model cannot run its default either, which is refused naming the field."""

from __future__ import annotations

import pytest
import torch

from distload.models import config_from_dict, supported_model_types

transformers = pytest.importorskip("transformers")

# model_type -> the field whose default no model can run (transformers' neither, below)
UNRUNNABLE = {"deepseek_v2": "num_experts_per_tok", "dots1": "n_routed_experts"}


def _default(model_type: str) -> dict:
    return transformers.AutoConfig.for_model(model_type).to_dict()


@pytest.mark.parametrize("model_type", supported_model_types())
def test_transformers_default_config_of_every_type_reads(model_type):
    config = _default(model_type)
    if model_type in UNRUNNABLE:
        with pytest.raises(ValueError, match=UNRUNNABLE[model_type]):
            config_from_dict(config)
        return
    ours = config_from_dict(config)
    assert ours.num_hidden_layers == config.get("num_hidden_layers", ours.num_hidden_layers)


def test_the_refused_default_does_not_run_in_transformers_either():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = transformers.DeepseekV2Config()
    assert config.num_experts_per_tok is None
    with pytest.raises(TypeError):
        DeepseekV2TopkRouter(config)(torch.zeros(2, config.hidden_size))


def test_dots1_default_does_not_build_in_transformers_either():
    config = transformers.AutoConfig.for_model("dots1")
    assert config.n_routed_experts is None and config.first_k_dense_replace < config.num_hidden_layers
    with pytest.raises(TypeError):
        with torch.device("meta"):
            transformers.AutoModelForCausalLM.from_config(config)


def test_qwen2_moe_sliding_window_zero_is_not_read_without_use_sliding_window():
    config = _default("qwen2_moe")
    assert config["sliding_window"] == 0 and config["use_sliding_window"] is False
    assert config_from_dict(config).sliding_window is None
    with pytest.raises(ValueError, match="sliding_window must be at least 1"):
        config_from_dict({**config, "use_sliding_window": True})
