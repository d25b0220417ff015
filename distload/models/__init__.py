"""Built-in architectures, written to be split into pipeline stages on the meta device,
behind a registry keyed by config.json's `model_type`. Knows nothing of checkpoints'
files or of ranks.

`contract.py` writes down what a model must do for the pipeline, the planner and the
loader (`StageModel`); `registry.py` maps model types to families; `common/` holds what
the families share (config readers, RoPE variants, norms, MLPs, attention, mixtures of
experts, the split-tolerant skeleton); each family is one file that composes those and
registers itself, imported below (one line per family).

Example::

    cfg = config_from_dict(json.load(open("ckpt/config.json")))
    with torch.device("meta"):
        model = build_model(cfg)      # no memory; materialize only what a rank keeps
"""

from . import llama as _llama  # noqa: F401  - registers llama, mistral, qwen2
from . import qwen3 as _qwen3  # noqa: F401  - qwen3
from . import qwen_moe as _qwen_moe  # noqa: F401  - qwen2_moe, qwen3_moe
from . import mixtral as _mixtral  # noqa: F401  - mixtral
from . import gemma as _gemma  # noqa: F401  - gemma, gemma2, gemma3_text, gemma3 (its text part)
from . import phi3 as _phi3  # noqa: F401  - phi3
from . import olmo2 as _olmo2  # noqa: F401  - olmo2
from . import granite as _granite  # noqa: F401  - granite
from . import starcoder2 as _starcoder2  # noqa: F401  - starcoder2
from . import glm4 as _glm4  # noqa: F401  - glm4
from . import smollm3 as _smollm3  # noqa: F401  - smollm3
from . import cohere as _cohere  # noqa: F401  - cohere
from . import deepseek_v2 as _deepseek_v2  # noqa: F401  - deepseek_v2
from . import deepseek_v3 as _deepseek_v3  # noqa: F401  - deepseek_v3
from . import gpt_oss as _gpt_oss  # noqa: F401  - gpt_oss
from . import glm4_moe as _glm4_moe  # noqa: F401  - glm4_moe
from . import olmoe as _olmoe  # noqa: F401  - olmoe
from . import ernie4_5 as _ernie4_5  # noqa: F401  - ernie4_5
from . import seed_oss as _seed_oss  # noqa: F401  - seed_oss
from . import olmo3 as _olmo3  # noqa: F401  - olmo3
from . import exaone4 as _exaone4  # noqa: F401  - exaone4
from . import cohere2 as _cohere2  # noqa: F401  - cohere2
from . import ministral3 as _ministral3  # noqa: F401  - ministral3
from . import llama4 as _llama4  # noqa: F401  - llama4_text, llama4 (its text part)
from . import gpt_neox as _gpt_neox  # noqa: F401  - gpt_neox
from . import phi as _phi  # noqa: F401  - phi
from . import qwen3_next as _qwen3_next  # noqa: F401  - qwen3_next
from . import qwen3_5 as _qwen3_5  # noqa: F401  - qwen3_5_text, qwen3_5 (its text part)
from . import gemma4 as _gemma4  # noqa: F401  - gemma4_text, gemma4 (its text part)
from . import ministral as _ministral  # noqa: F401  - ministral, cwm
from . import olmo as _olmo  # noqa: F401  - olmo
from . import helium as _helium  # noqa: F401  - helium
from . import arcee as _arcee  # noqa: F401  - arcee
from . import glm as _glm  # noqa: F401  - glm
from . import llama_variants as _llama_variants  # noqa: F401  - internlm3, iquestcoder, exaone
from . import apertus as _apertus  # noqa: F401  - apertus
from . import hunyuan_v1_dense as _hunyuan_v1_dense  # noqa: F401  - hunyuan_v1_dense
from . import hunyuan_v1_moe as _hunyuan_v1_moe  # noqa: F401  - hunyuan_v1_moe
from . import stablelm as _stablelm  # noqa: F401  - stablelm
from . import persimmon as _persimmon  # noqa: F401  - persimmon
from . import nemotron as _nemotron  # noqa: F401  - nemotron
from . import vaultgemma as _vaultgemma  # noqa: F401  - vaultgemma
from . import qwen3_5_moe as _qwen3_5_moe  # noqa: F401  - qwen3_5_moe_text, qwen3_5_moe (its text part)
from . import ernie4_5_moe as _ernie4_5_moe  # noqa: F401  - ernie4_5_moe
from . import glm4_moe_lite as _glm4_moe_lite  # noqa: F401  - glm4_moe_lite
from . import dots1 as _dots1  # noqa: F401  - dots1
from . import exaone_moe as _exaone_moe  # noqa: F401  - exaone_moe
from . import granitemoe as _granitemoe  # noqa: F401  - granitemoe, granitemoeshared
from . import minimax_m2 as _minimax_m2  # noqa: F401  - minimax_m2
from . import jais2 as _jais2  # noqa: F401  - jais2
from . import phimoe as _phimoe  # noqa: F401  - phimoe
from . import cohere2_moe as _cohere2_moe  # noqa: F401  - cohere2_moe
from . import gptj as _gptj  # noqa: F401  - gptj, codegen
from . import solar_open as _solar_open  # noqa: F401  - solar_open
from . import hyperclovax as _hyperclovax  # noqa: F401  - hyperclovax
from . import flex_olmo as _flex_olmo  # noqa: F401  - flex_olmo
from . import youtu as _youtu  # noqa: F401  - youtu
from . import bitnet as _bitnet  # noqa: F401  - bitnet
from . import gpt2 as _gpt2  # noqa: F401  - gpt2, gpt_bigcode
from . import opt as _opt  # noqa: F401  - opt
from . import bloom as _bloom  # noqa: F401  - bloom
from . import falcon as _falcon  # noqa: F401  - falcon
from . import gpt_neo as _gpt_neo  # noqa: F401  - gpt_neo
from .cache import KVCache
from .contract import StageModel
from .llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from .registry import (ModelFamily, build_model, config_from_dict, family_for, register_family,
                       supported_model_types)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = supported_model_types()

__all__ = [
    "SUPPORTED_MODEL_TYPES", "StageModel", "KVCache", "ModelFamily", "register_family",
    "family_for", "config_from_dict", "build_model", "supported_model_types",
    "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer",
]
