"""Hand-written safetensors files whose tensors sit where no writer would put them (an
odd header length, odd-sized uint8 and bool tensors before wider ones: misaligned for
their dtype and for O_DIRECT's blocks), and destinations to read them into. Shared by
the reader's CPU and CUDA tests."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load_file

from distload.checkpoint.safetensors_header import read_safetensors_header

__all__ = ["write_odd_safetensors", "odd_tensors", "odd_checkpoint", "make_dests", "assert_equal"]

_ST = {torch.uint8: "U8", torch.bfloat16: "BF16", torch.float32: "F32", torch.bool: "BOOL",
       torch.float16: "F16", torch.int64: "I64", torch.float64: "F64"}


def write_odd_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """A valid safetensors file whose header length is odd and whose tensors follow each
    other with no padding, in the order given."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    if (8 + len(text)) % 2 == 0:
        text += b" "
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def odd_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{seed}.{name}": t for name, t in _layout(g).items()}


def _layout(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "a.u8": torch.randint(0, 256, (7,), dtype=torch.uint8, generator=g),
        "b.bf16": torch.randn(301, 257, generator=g).to(torch.bfloat16),     # ~155 KB: 3 chunks of 64K
        "c.f32": torch.randn(33, generator=g),
        "d.bool": torch.randint(0, 2, (5,), generator=g).bool(),
        "e.f16": torch.randn(70001, generator=g).to(torch.float16),
        "f.scalar": torch.tensor(3.25, dtype=torch.float64),
        "g.i64": torch.randint(-9, 9, (3, 5), generator=g),
        "h.f32": torch.randn(128, 300, generator=g),                          # ~154 KB
        "i.empty": torch.empty(0, 4),
    }


def make_dests(metas, cast=None, device="cpu"):
    out = {}
    for m in metas:
        dtype = cast if cast is not None and m.torch_dtype.is_floating_point else m.torch_dtype
        out[m.name] = (torch.full(m.shape, 7, dtype=dtype, device=device) if m.numel
                       else torch.empty(m.shape, dtype=dtype, device=device))
    return out


def assert_equal(dests, reference, cast=None):
    assert set(dests) == set(reference)
    for name, want in reference.items():
        if cast is not None and want.dtype.is_floating_point:
            want = want.to(cast)
        got = dests[name].cpu()
        assert got.dtype == want.dtype and torch.equal(got, want), name


def odd_checkpoint(root) -> tuple[list[str], list, dict[str, torch.Tensor]]:
    """Two odd files under `root`: (their paths, their metas, safetensors' tensors)."""
    files = []
    for k in range(2):
        path = root / f"part{k}.safetensors"
        write_odd_safetensors(path, odd_tensors(k))
        files.append(str(path))
    metas = [m for f in files for m in read_safetensors_header(f)]
    assert any(m.offset % m.torch_dtype.itemsize for m in metas), "no misaligned tensor: the test is moot"
    return files, metas, {k: v for f in files for k, v in load_file(f).items()}
