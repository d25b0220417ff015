"""What distload knows of one tensor in a checkpoint, from the file header alone."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch

from .dtypes import dtype_from_name

__all__ = ["TensorMeta", "SAFETENSORS_DTYPES"]

# safetensors dtype names -> torch dtypes; fp8 kinds only where this torch has them.
_ST_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    st: getattr(torch, name) for st, name in _ST_DTYPES.items() if hasattr(torch, name)
}


@dataclass(frozen=True, order=True)
class TensorMeta:
    """One tensor's place in a checkpoint file.

    `file` is relative to the checkpoint's root in an index and a plan (each rank finds
    the root on its own node), absolute where a header was read on its own; `offset` is
    the absolute byte offset in the file (header already added), -1 where the file has no
    byte ranges (a pickled `.bin`); `length` the byte count; `dtype` the torch dtype name
    (e.g. ``"bfloat16"``).
    """

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def located(self, root: str | os.PathLike) -> "TensorMeta":
        """This tensor with `file` joined to the checkpoint `root` (a path to open)."""
        return replace(self, file=os.path.join(os.fspath(root), self.file))
