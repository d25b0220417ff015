"""Dtype names, the user's aliases for them, and the one rule for casting.

Plans and reports name dtypes by torch's name without the prefix (``"bfloat16"``). A
cast the user asks for applies to floating-point tensors only: integer and boolean
tensors (token type ids, quantization scales stored as ints, masks) keep their dtype.

Example::

    normalize_dtype("bf16")                  # "bfloat16"
    cast_dtype("float32", "bfloat16")        # "bfloat16"
    cast_dtype("int64", "bfloat16")          # "int64": never cast
"""

from __future__ import annotations

import torch

__all__ = ["dtype_name", "dtype_from_name", "normalize_dtype", "cast_dtype", "is_floating",
           "FLOAT32_STEP_ELEMENTS"]

# Elements a loop over a whole tensor turns into float32 temporaries at once (16 MiB of
# them): drawing random weights, decoding quantized blocks. Bounds the temporaries, whatever
# the tensor.
FLOAT32_STEP_ELEMENTS = 1 << 22

_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32", "auto": None, "none": None}


def dtype_from_name(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`; raises ValueError on names torch lacks."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"` (the form plans store)."""
    return str(dtype).removeprefix("torch.")


def is_floating(name: str) -> bool:
    """Whether the dtype called `name` is a floating-point one (fp8 kinds included)."""
    return dtype_from_name(name).is_floating_point


def normalize_dtype(dtype: torch.dtype | str | None) -> str | None:
    """`torch.bfloat16`, "bf16", "bfloat16", "torch.bfloat16" → "bfloat16"; None/"auto" →
    None (keep the checkpoint's dtypes). Anything but a floating-point dtype raises
    ValueError saying what to pass.

    Example::

        normalize_dtype(torch.float16), normalize_dtype("fp32")   # "float16", "float32"
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        name: str | None = dtype_name(dtype)
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        name = _ALIASES.get(key, key)
    else:
        raise ValueError(f"dtype {dtype!r} is not a torch dtype or a name like 'bfloat16'")
    if name is None:
        return None
    candidate = getattr(torch, name, None)
    if not (isinstance(candidate, torch.dtype) and candidate.is_floating_point):
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype "
                         "(use bfloat16, float16 or float32)")
    return name


def cast_dtype(stored: str, wanted: str | None) -> str:
    """The dtype a tensor stored as `stored` is materialized in when the user asked for
    `wanted` (None: keep it): floating-point tensors take `wanted`, others never change.

    Example::

        cast_dtype("bfloat16", "float32"), cast_dtype("int32", "float32")   # float32, int32
    """
    return wanted if wanted is not None and is_floating(stored) else stored
