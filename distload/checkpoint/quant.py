"""Quantized checkpoints, as the planner sees them: which format `config.json` declares,
and each quantized weight as one *encoded* tensor — the model's name and decoded shape,
made of the checkpoint tensors (its parts) that hold it.

Formats (``quantization_config.quant_method``):

* ``"fp8"`` — float8 e4m3 weights, each with ``<name>_scale_inv`` (float32, one per
  `weight_block_size` block, ``[ceil(rows / b0), ceil(cols / b1)]``: a side that is not a
  multiple of the block ends in a clipped block — DeepSeek-V3's 576-row
  ``kv_a_proj_with_mqa``); without `weight_block_size`, one scale per tensor. DeepSeek-V3/R1,
  Qwen3-FP8, GLM FP8.
* ``"mxfp4"`` — ``<name>_blocks`` (uint8 ``[..., rows, G, 16]``: 32 e2m1 values per group,
  two per byte) and ``<name>_scales`` (uint8 ``[..., rows, G]``: a power of two, biased by
  127); the decoded tensor is ``[E, G * 32, rows]`` for ``[E, rows, G, 16]`` blocks, as
  transformers lays gpt-oss's experts out. gpt-oss.

Any other ``quant_method`` (GPTQ, AWQ, bitsandbytes, compressed-tensors, ...) is refused by
name before any tensor is read (`quant_scheme`). Decoding itself is `distload.checkpoint.dequant`.

Each encoded tensor keeps its parts' byte ranges: a rank reads exactly the quantized bytes
and scales of its own weights, and the ranks' reads still sum to the checkpoint's bytes.

Example::

    scheme = quant_scheme(index.config)                   # None for a plain checkpoint
    tensors, encoded = decoded_view(index.tensors, scheme)
    tensors["model.layers.0.self_attn.o_proj.weight"].dtype    # 'bfloat16' (decoded)
    encoded["model.layers.0.self_attn.o_proj.weight"].parts    # (fp8 weight, its scales)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .types import TensorMeta

__all__ = ["QuantScheme", "Encoded", "quant_scheme", "decoded_view", "SUPPORTED_QUANT_METHODS",
           "DECODED_DTYPE"]

SUPPORTED_QUANT_METHODS = ("fp8", "mxfp4")
DECODED_DTYPE = "bfloat16"      # what a quantized weight becomes unless --dtype says otherwise
_FP8_WEIGHT = "float8_e4m3fn"
_FP8_SCALES = ("float32", "bfloat16", "float16", "float8_e8m0fnu", "uint8")


@dataclass(frozen=True)
class QuantScheme:
    """A checkpoint's quantization: `method` (``"fp8"`` or ``"mxfp4"``) and, for fp8, the
    block ``(rows, cols)`` one scale covers (None: one scale per tensor)."""

    method: str
    block: tuple[int, int] | None = None


@dataclass(frozen=True)
class Encoded:
    """One decoded tensor: `key` (the name the model's parameter reads), its decoded
    `shape`, and the checkpoint tensors it is made of (`parts`: fp8 ``(weight,
    scale_inv)``, mxfp4 ``(blocks, scales)``)."""

    key: str
    method: str
    shape: tuple[int, ...]
    parts: tuple[TensorMeta, ...]
    block: tuple[int, int] | None = None

    def as_dict(self) -> dict:
        """The plan's form: ``{"method", "parts": [names], "block"}``."""
        return {"method": self.method, "parts": [p.name for p in self.parts],
                "block": list(self.block) if self.block else None}


def quant_scheme(config: Mapping[str, Any] | None) -> QuantScheme | None:
    """The quantization `config` (a config.json dict) declares, None for none; ValueError
    naming ``quant_method`` for a format distload does not decode, or the field at fault.

    Example::

        quant_scheme({"quantization_config": {"quant_method": "gptq", "bits": 4}})
        # ValueError: quantization_config.quant_method 'gptq' is not supported ...
    """
    q = (config or {}).get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise ValueError(f"quantization_config must be an object, not {q!r}")
    method = q.get("quant_method")
    if method not in SUPPORTED_QUANT_METHODS:
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported: distload "
                         f"decodes {', '.join(SUPPORTED_QUANT_METHODS)} checkpoints (fp8 block scales, "
                         "mxfp4); load a bfloat16 export of this model instead")
    if method == "mxfp4":
        return QuantScheme("mxfp4")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt {fmt!r} is not supported (fp8 e4m3 only)")
    block = q.get("weight_block_size")
    if block is None:
        return QuantScheme("fp8")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive integers, "
                         f"not {block!r}")
    return QuantScheme("fp8", (block[0], block[1]))


def decoded_view(tensors: Mapping[str, TensorMeta], scheme: QuantScheme | None
                 ) -> tuple[dict[str, TensorMeta], dict[str, Encoded]]:
    """(`tensors` as the model sees them, the encoded ones by key). Each quantized weight
    becomes one meta under its model name with the decoded shape, dtype `DECODED_DTYPE`,
    and the summed length of its parts (so a checkpoint's bytes still add up); its parts
    disappear from the view. ValueError naming the file and tensor for a part that is
    missing or of the wrong dtype or shape.

    Example::

        view, encoded = decoded_view({w.name: w, s.name: s}, QuantScheme("fp8", (128, 128)))
    """
    if scheme is None:
        return dict(tensors), {}
    find = _fp8 if scheme.method == "fp8" else _mxfp4
    out: dict[str, TensorMeta] = {}
    encoded: dict[str, Encoded] = {}
    consumed: set[str] = set()
    for name, meta in tensors.items():
        enc = find(name, meta, tensors, scheme)
        if enc is None:
            continue
        encoded[enc.key] = enc
        consumed.update(p.name for p in enc.parts)
        first = enc.parts[0]
        out[enc.key] = replace(first, name=enc.key, dtype=DECODED_DTYPE, shape=enc.shape,
                               length=sum(p.length for p in enc.parts))
    for name, meta in tensors.items():
        if name in consumed:
            continue
        if scheme.method == "fp8" and meta.dtype == _FP8_WEIGHT:
            raise ValueError(f"{meta.file}: fp8 tensor {name} has no {name}_scale_inv beside it "
                             "(quantization_config.quant_method fp8)")
        if scheme.method == "mxfp4" and name.endswith(("_blocks", "_scales")):
            other = name[:-7] + ("_scales" if name.endswith("_blocks") else "_blocks")
            raise ValueError(f"{meta.file}: mxfp4 tensor {name} has no {other} beside it")
        if scheme.method == "fp8" and name.endswith("_scale_inv"):
            raise ValueError(f"{meta.file}: fp8 scale {name} has no weight {name[:-10]} beside it")
        out[name] = meta
    return out, encoded


def _fp8(name: str, meta: TensorMeta, tensors: Mapping[str, TensorMeta], scheme: QuantScheme
         ) -> Encoded | None:
    scale = tensors.get(name + "_scale_inv")
    if scale is None:
        return None
    if meta.dtype != _FP8_WEIGHT:
        raise ValueError(f"{meta.file}: {name} has scales ({scale.name}) but is {meta.dtype}, "
                         f"not {_FP8_WEIGHT}")
    if scale.dtype not in _FP8_SCALES:
        raise ValueError(f"{scale.file}: fp8 scale {scale.name} is {scale.dtype}; expected one of "
                         f"{', '.join(_FP8_SCALES)}")
    if meta.offset < 0 or scale.offset < 0:
        raise ValueError(f"{meta.file}: fp8 tensor {name} is in a pickled checkpoint; distload "
                         "decodes quantized weights from safetensors files only")
    if scheme.block is None:
        if math.prod(scale.shape) != 1:
            raise ValueError(f"{scale.file}: fp8 scale {scale.name} has shape {list(scale.shape)}; "
                             "without weight_block_size one scale per tensor is expected")
    else:
        if len(meta.shape) < 2:
            raise ValueError(f"{meta.file}: fp8 tensor {name} has shape {list(meta.shape)}; block "
                             "scales need a matrix")
        rows, cols = meta.shape[-2:]
        want = (*meta.shape[:-2], -(-rows // scheme.block[0]), -(-cols // scheme.block[1]))
        if tuple(scale.shape) != want:
            raise ValueError(f"{scale.file}: fp8 scale {scale.name} has shape {list(scale.shape)}; "
                             f"{name} {list(meta.shape)} in blocks of {list(scheme.block)} needs "
                             f"{list(want)}")
    return Encoded(name, "fp8", tuple(meta.shape), (meta, scale), scheme.block)


def _mxfp4(name: str, meta: TensorMeta, tensors: Mapping[str, TensorMeta], scheme: QuantScheme
           ) -> Encoded | None:
    if not name.endswith("_blocks"):
        return None
    key = name[: -len("_blocks")]
    scales = tensors.get(key + "_scales")
    if scales is None:
        return None   # reported by decoded_view
    for part in (meta, scales):
        if part.dtype != "uint8":
            raise ValueError(f"{part.file}: mxfp4 tensor {part.name} is {part.dtype}, not uint8")
        if part.offset < 0:
            raise ValueError(f"{part.file}: mxfp4 tensor {part.name} is in a pickled checkpoint; "
                             "distload decodes quantized weights from safetensors files only")
    if len(meta.shape) != 4 or meta.shape[-1] != 16 or tuple(scales.shape) != tuple(meta.shape[:-1]):
        raise ValueError(f"{meta.file}: mxfp4 tensors {name} {list(meta.shape)} and {scales.name} "
                         f"{list(scales.shape)}; expected [experts, rows, groups, 16] and "
                         "[experts, rows, groups]")
    experts, rows, groups, _ = meta.shape
    return Encoded(key, "mxfp4", (experts, groups * 32, rows), (meta, scales))
