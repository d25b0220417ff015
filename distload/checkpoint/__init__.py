"""Checkpoints: reading and validating safetensors/`.bin` headers and index files,
indexing every tensor (`TensorMeta`: file relative to the checkpoint root, dtype, shape,
byte range), and writing checkpoints in the Hugging Face sharded layout.

Knows nothing of where files come from (`distload.sources`), of models or of ranks; rank 0
uses it to build the plan every rank shares.

Example::

    from distload.checkpoint import index_checkpoint

    idx = index_checkpoint("./llama")
    meta = idx.tensors["model.embed_tokens.weight"]   # file, offset, length, dtype, shape
"""

from distload.checkpoint.bin import load_bin_tensors, read_bin_metas
from distload.checkpoint.files import byte_view, open_checkpoint_file
from distload.checkpoint.index import CheckpointIndex, index_checkpoint, index_from_headers, read_weight_map
from distload.checkpoint.safetensors_header import parse_safetensors_header, read_safetensors_header
from distload.checkpoint.types import SAFETENSORS_DTYPES, TensorMeta
from distload.checkpoint.writer import INDEX_NAME, write_sharded_checkpoint

__all__ = [
    "TensorMeta",
    "SAFETENSORS_DTYPES",
    "read_safetensors_header",
    "parse_safetensors_header",
    "read_bin_metas",
    "load_bin_tensors",
    "CheckpointIndex",
    "index_checkpoint",
    "index_from_headers",
    "read_weight_map",
    "write_sharded_checkpoint",
    "INDEX_NAME",
    "open_checkpoint_file",
    "byte_view",
]
