"""Built-in architectures, written to be split into pipeline stages on the meta device,
behind a registry keyed by config.json's `model_type`. Knows nothing of checkpoints'
files or of ranks.

`contract.py` writes down what a model must do for the pipeline, the planner and the
loader (`StageModel`); `registry.py` maps model types to families; each family is one
file that registers itself, imported below (one line per family).

Example::

    cfg = config_from_dict(json.load(open("ckpt/config.json")))
    with torch.device("meta"):
        model = build_model(cfg)      # no memory; materialize only what a rank keeps
"""

from . import llama as _llama  # noqa: F401  - registers llama, mistral, qwen2
from .cache import KVCache
from .config import LlamaConfig
from .contract import StageModel
from .llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from .registry import (ModelFamily, build_model, config_from_dict, family_for, register_family,
                       supported_model_types)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = supported_model_types()

__all__ = [
    "SUPPORTED_MODEL_TYPES", "StageModel", "KVCache", "ModelFamily", "register_family",
    "family_for", "config_from_dict", "build_model", "supported_model_types",
    "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer",
]
