"""What the built-in families share: the config base and readers (`config`), RoPE
variants (`rope`), norms, activations and MLPs (`layers`), attention and masks
(`attention`), mixtures of experts and packed-expert mapping (`moe`), and the split-tolerant
skeleton every family fills in (`decoder`). A family file composes these; it never copies
them.

Example::

    from distload.models.common import Attention, DecoderForCausalLM, RMSNorm
"""

from .attention import Attention, attend, attention_mask_bias
from .config import FULL, SLIDING, DecoderConfig, read_decoder, text_config
from .decoder import DecoderForCausalLM, DecoderLayer, DecoderModel, nested_text_tensors
from .layers import (FusedGatedMLP, GatedMLP, LayerNormNoBias, PlainMLP, RMSNorm, UpDownMLP, activation,
                     linear_flops, linear_outputs)
from .moe import SparseMoE, unpack_experts
from .rope import RopeParams, RotaryEmbedding, apply_rope, read_rope, rope_inv_freq

__all__ = [
    "Attention", "attend", "attention_mask_bias", "DecoderConfig", "read_decoder", "text_config",
    "SLIDING", "FULL", "DecoderForCausalLM", "DecoderLayer", "DecoderModel", "nested_text_tensors",
    "GatedMLP", "FusedGatedMLP", "PlainMLP", "UpDownMLP", "RMSNorm", "LayerNormNoBias", "activation",
    "linear_flops", "linear_outputs", "SparseMoE", "unpack_experts", "RopeParams",
    "RotaryEmbedding", "apply_rope", "read_rope", "rope_inv_freq",
]
