"""What distload knows of one tensor in a checkpoint, from the file header alone."""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

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


def dtype_from_name(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`; raises ValueError on names torch lacks."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"` (the form plans store)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, order=True)
class TensorMeta:
    """One tensor's place in a checkpoint file.

    `offset` is the absolute byte offset in `file` (header already added), `length` the
    byte count; `dtype` is the torch dtype name (e.g. ``"bfloat16"``).
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
