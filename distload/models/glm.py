"""GLM-4 (the first, ``glm``; THUDM/glm-4-9b): GLM-4-0414's attention (q/k/v biases,
interleaved RoPE on part of each head) and fused ``gate_up_proj`` MLP in Llama's two-norm
layer, without GLM-4-0414's norms after attention and MLP."""

from __future__ import annotations

from .common.decoder import PreNormDecoderLayer
from .common.layers import FusedGatedMLP, RMSNorm
from .glm4 import Glm4Config, Glm4ForCausalLM, glm4_attention, read_glm4
from .registry import ModelFamily, register_family

__all__ = ["GlmForCausalLM", "GlmDecoderLayer"]


class GlmDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Glm4Config, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = glm4_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = FusedGatedMLP(h, config.intermediate_size, act=config.hidden_act)


class GlmForCausalLM(Glm4ForCausalLM):
    """A ``glm`` causal LM: GLM-4-0414's over `GlmDecoderLayer`; its config is GLM-4-0414's
    (`read_glm4`: same fields, same defaults)."""

    _no_split_modules = ["GlmDecoderLayer"]

    def __init__(self, config: Glm4Config) -> None:
        super().__init__(config, layer=GlmDecoderLayer)


register_family(ModelFamily(("glm",), read_glm4, GlmForCausalLM))
