"""Quantized checkpoints written in the published formats with safetensors, for the tests
(no GPU, no quantization library): FP8 e4m3 with per-block ``weight_scale_inv``
(DeepSeek-V3's layout) and MXFP4 ``_blocks`` / ``_scales`` (gpt-oss's). Each quantizer
also gives the exact decoded values, computed block by block with plain loops (an
implementation independent of distload's), so a test's reference model can load them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["fp8_quantize", "fp8_reference", "quantize_checkpoint_fp8", "mxfp4_quantize",
           "mxfp4_reference", "quantize_checkpoint_mxfp4"]

FP8_MAX = 448.0
# DeepSeek-V3 keeps these in bfloat16: embeddings, head, norms, routers (and their biases).
_KEEP = re.compile(r"(embed_tokens|lm_head|norm|\.mlp\.gate\.|bias$)")


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [R, C] → (e4m3 weight [R, C], float32 scale_inv [ceil(R/b0), ceil(C/b1)]): each
    block's scale maps its largest magnitude to 448; the last blocks of a side are clipped."""
    rows, cols = w.shape
    b0, b1 = block
    grid = (math.ceil(rows / b0), math.ceil(cols / b1))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            sub = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].float()
            scale = (sub.abs().max() / FP8_MAX).item() or 1.0
            s[i, j] = scale
            q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (sub / scale).to(torch.float8_e4m3fn)
    return q, s


def fp8_reference(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The decoded float32 values of (`q`, `s`), one block at a time."""
    out = torch.empty(q.shape, dtype=torch.float32)
    b0, b1 = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            sl = (slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1))
            out[sl] = q[sl].float() * s[i, j].item()
    return out


def quantize_checkpoint_fp8(src: Path, dst: Path, ref: Path, block: tuple[int, int]) -> Path:
    """`src` (a saved checkpoint) rewritten into `dst` with every matrix of its decoder
    layers in FP8 blocks (the rest as it was, same shards), config.json declaring
    ``quant_method: fp8``; `ref` gets the same model with the decoded values (float32),
    for a reference model to load."""
    dst.mkdir(parents=True)
    ref.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    quantized_map, ref_map = {}, {}
    for shard in sorted(set(index["weight_map"].values())):
        out, plain = {}, {}
        with safe_open(src / shard, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.ndim == 2 and key.startswith("model.layers.") and not _KEEP.search(key):
                    q, s = fp8_quantize(t, block)
                    out[key], out[key + "_scale_inv"] = q, s
                    plain[key] = fp8_reference(q, s, block)
                else:
                    out[key] = plain[key] = t
        save_file(out, dst / shard, metadata={"format": "pt"})
        save_file(plain, ref / shard, metadata={"format": "pt"})
        quantized_map.update({k: shard for k in out})
        ref_map.update({k: shard for k in plain})
    for path, weight_map in ((dst, quantized_map), (ref, ref_map)):
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}))
    config = json.loads((src / "config.json").read_text())
    (ref / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "fmt": "e4m3", "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


_FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [E, rows, cols] (cols a multiple of 32) → (blocks uint8 [E, rows, cols/32, 16],
    scales uint8 [E, rows, cols/32]): each group of 32 gets the power of two that puts its
    largest magnitude at or under 6, each value the nearest e2m1 (low nibble first)."""
    e, rows, cols = w.shape
    groups = w.float().reshape(e, rows, cols // 32, 32)
    amax = groups.abs().amax(-1).clamp_min(2.0 ** -100)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exp)[..., None]
    table = torch.tensor(_FP4)
    nibble = (scaled[..., None] - table).abs().argmin(-1).to(torch.uint8)
    blocks = nibble[..., 0::2] | (nibble[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [E, cols, rows] (transformers' gpt-oss layout) of (`blocks`, `scales`), value
    by value from the e2m1 table."""
    e, rows, groups, _ = blocks.shape
    out = torch.empty(e, rows, groups * 32)
    for x in range(e):
        for r in range(rows):
            for g in range(groups):
                scale = 2.0 ** (int(scales[x, r, g]) - 127)
                for i, byte in enumerate(blocks[x, r, g].tolist()):
                    out[x, r, g * 32 + 2 * i] = _FP4[byte & 15] * scale
                    out[x, r, g * 32 + 2 * i + 1] = _FP4[byte >> 4] * scale
    return out.transpose(1, 2)


# gpt-oss's published MXFP4 checkpoints quantize the experts' matrices and nothing else.
MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def quantize_checkpoint_mxfp4(src: Path, dst: Path) -> Path:
    """`src` (a saved gpt-oss checkpoint, sides multiples of 32) rewritten into `dst` in the
    published layout: each ``experts.gate_up_proj`` / ``experts.down_proj`` ([E, in, out])
    as ``_blocks`` and ``_scales`` of its transpose, the rest as it was, same shards;
    config.json declaring ``quant_method: mxfp4``."""
    dst.mkdir(parents=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        with safe_open(src / shard, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    out[key + "_blocks"], out[key + "_scales"] = mxfp4_quantize(t.transpose(1, 2).contiguous())
                else:
                    out[key] = t
        save_file(out, dst / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_NOT_CONVERTED}
    (dst / "config.json").write_text(json.dumps(config))
    return dst
