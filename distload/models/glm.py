"""GLM-4 (the first, ``glm``; THUDM/glm-4-9b): GLM-4-0414's attention (q/k/v biases,
interleaved RoPE on part of each head) and fused ``gate_up_proj`` MLP in Llama's two-norm
layer, without GLM-4-0414's norms after attention and MLP."""

from __future__ import annotations

from .common.attention import Attention
from .common.decoder import DecoderForCausalLM, DecoderModel, PreNormDecoderLayer
from .common.layers import FusedGatedMLP, RMSNorm
from .glm4 import Glm4Config, read_glm4
from .registry import ModelFamily, register_family

__all__ = ["GlmForCausalLM", "GlmDecoderLayer"]


class GlmDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: Glm4Config, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention.for_layer(config, layer_idx, qkv_bias=config.attention_bias,
                                             interleaved_rope=True)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = FusedGatedMLP(h, config.intermediate_size, act=config.hidden_act)


class GlmForCausalLM(DecoderForCausalLM):
    """A ``glm`` causal LM; its config is GLM-4-0414's (`read_glm4`: same fields, same defaults)."""

    _no_split_modules = ["GlmDecoderLayer"]

    def __init__(self, config: Glm4Config) -> None:
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, DecoderModel(config, GlmDecoderLayer, norm=norm, interleaved_rope=True))


register_family(ModelFamily(("glm",), read_glm4, GlmForCausalLM))
