"""Checkpoints: finding their files, reading headers, indexing every tensor.

Knows nothing of models or ranks; rank 0 uses it to build the plan every rank shares.

Example::

    from distload.checkpoint import index_checkpoint, resolve_model

    idx = index_checkpoint(resolve_model("Qwen/Qwen2-0.5B"))
    meta = idx.tensors["model.embed_tokens.weight"]   # file, offset, length, dtype, shape
"""

from distload.checkpoint.bin import load_bin_tensors, read_bin_metas
from distload.checkpoint.index import CheckpointIndex, index_checkpoint
from distload.checkpoint.resolve import parse_hub_id, resolve_model
from distload.checkpoint.safetensors_header import read_safetensors_header
from distload.checkpoint.types import SAFETENSORS_DTYPES, TensorMeta, dtype_from_name, dtype_name
from distload.checkpoint.writer import INDEX_NAME, write_sharded_checkpoint

__all__ = [
    "TensorMeta",
    "SAFETENSORS_DTYPES",
    "dtype_name",
    "dtype_from_name",
    "read_safetensors_header",
    "read_bin_metas",
    "load_bin_tensors",
    "CheckpointIndex",
    "index_checkpoint",
    "resolve_model",
    "parse_hub_id",
    "write_sharded_checkpoint",
    "INDEX_NAME",
]
