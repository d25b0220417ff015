"""Decoding quantized weights (`distload.checkpoint.quant`) into a floating-point dtype, on
whatever device the tensors are. Pure tensor functions; the loader calls them on each
rank's own weights right after reading them.

The arithmetic is transformers' (float32 products, one rounding to the target dtype), so
the results are equal to its `FineGrainedFP8Config(dequantize=True)` and
`Mxfp4Config(dequantize=True)` loads — except that a side which is not a multiple of the
fp8 block uses `weight_block_size` with the last block clipped, where transformers 5.25
derives the block from the scale grid (and raises, or silently scales the wrong rows).

Example::

    w = torch.empty(576, 7168, dtype=torch.bfloat16)
    w.copy_(fp8_weight)                           # e4m3 -> bf16 is exact
    apply_block_scales_(w, scale_inv, (128, 128)) # w = fp8 * scale, per block
    experts = mxfp4_decode(blocks, scales, torch.bfloat16)     # [E, G * 32, rows]
"""

from __future__ import annotations

import torch

from .dtypes import FLOAT32_STEP_ELEMENTS

__all__ = ["apply_block_scales_", "fp8_decode", "mxfp4_decode", "FP4_VALUES"]

# e2m1: the 16 values of a nibble (sign bit 3).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales; uint8 ones are e8m0 exponents (``2 ** (byte - 127)``)."""
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def apply_block_scales_(weight: torch.Tensor, scale: torch.Tensor,
                        block: tuple[int, int] | None) -> torch.Tensor:
    """Multiply `weight` ``[..., rows, cols]`` (already the fp8 values, in its floating
    dtype) in place by `scale` — one per ``block`` (``[..., ceil(rows/b0), ceil(cols/b1)]``;
    the last block of a side clipped), or a single scale with `block` None — computing in
    float32 and rounding once. Returns `weight`."""
    s = _scale_values(scale.to(weight.device))
    if block is None:
        return weight.copy_((weight.float() * s.reshape(())).to(weight.dtype))
    b0, b1 = block
    rows, cols = weight.shape[-2:]
    w = weight.view(-1, rows, cols)
    s = s.reshape(-1, s.shape[-2], s.shape[-1])
    step = max(b0, (FLOAT32_STEP_ELEMENTS // max(cols, 1)) // b0 * b0)
    for lead in range(w.shape[0]):
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            grid = s[lead, r0 // b0: -(-r1 // b0)]
            full = grid.repeat_interleave(b0, dim=0)[: r1 - r0].repeat_interleave(b1, dim=1)[:, :cols]
            part = w[lead, r0:r1]
            part.copy_((part.float() * full).to(weight.dtype))
    return weight


def fp8_decode(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor:
    """A new `dtype` tensor: the fp8 `weight` times its `scale` (see `apply_block_scales_`)."""
    return apply_block_scales_(weight.to(dtype), scale, block)


def mxfp4_decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 `blocks` ``[E, rows, G, 16]`` (uint8, two e2m1 values a byte, low nibble
    first) and `scales` ``[E, rows, G]`` (uint8 exponents biased by 127) → ``[E, G * 32,
    rows]`` in `dtype` (into `out` when given), the layout transformers gives gpt-oss's
    experts."""
    experts, rows, groups, width = blocks.shape
    if out is None:
        out = torch.empty(experts, groups * width * 2, rows, dtype=dtype, device=blocks.device)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    exps = scales.to(torch.int32) - 127
    per_expert = max(1, FLOAT32_STEP_ELEMENTS // max(groups * width * 2, 1))
    for e in range(experts):
        for r0 in range(0, rows, per_expert):
            r1 = min(r0 + per_expert, rows)
            blk = blocks[e, r0:r1].to(torch.uint8)
            vals = torch.stack((lut[(blk & 0x0F).long()], lut[(blk >> 4).long()]), dim=-1)
            vals = torch.ldexp(vals.reshape(r1 - r0, groups, width * 2), exps[e, r0:r1, :, None].float())
            out[e, :, r0:r1].copy_(vals.reshape(r1 - r0, groups * width * 2).t().to(dtype))
    return out
