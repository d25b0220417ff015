"""Reading a rank's quantized weights and decoding them into their storage: the step of
`read_stage` for the keys a plan marks `StagePlan.decode` (see
`distload.checkpoint.quant`). Every rank calls it on its own keys only.

An fp8 weight is read straight into its storage (e4m3 → bfloat16/float16/float32 is
exact), its scales into a small temporary beside it, then scaled in place. MXFP4 blocks
and scales go through temporaries, a batch of at most `BATCH_BYTES` quantized bytes at a
time, so the extra memory stays bounded whatever the stage's size.

Example::

    stats = read_decoded(reads, storage, plan.stage(rank).decode, reader=reader)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from ..checkpoint.dequant import apply_block_scales_, mxfp4_decode
from ..checkpoint.types import TensorMeta
from ..io import Reader, ReadProgress, ReadStats

__all__ = ["read_decoded", "DecodedOnDemand", "BATCH_BYTES"]

BATCH_BYTES = 256 << 20


def _batches(keys: Sequence[str], size: Mapping[str, int]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    total = 0
    for key in keys:
        if out[-1] and total + size[key] > BATCH_BYTES:
            out.append([])
            total = 0
        out[-1].append(key)
        total += size[key]
    return [b for b in out if b]


def read_decoded(reads: Sequence[TensorMeta], storage: dict[str, torch.Tensor],
                 decode: Mapping[str, dict], *, reader: Reader, progress: ReadProgress | None = None,
                 workers: int | None = None) -> ReadStats:
    """Read the parts of every key of `decode` (names into `reads`, the stage's read
    items) with `reader` and decode them into ``storage[key]`` (`workers`: the reader's
    override). Returns the read's figures (quantized bytes)."""
    read_kw = dict(progress=progress, workers=workers)
    metas = {m.name: m for m in reads}
    stats = ReadStats()
    fp8 = sorted(k for k, d in decode.items() if d["method"] == "fp8")
    if fp8:
        # Weights straight into their storage (a cast of exact values), scales beside them.
        scales = {decode[k]["parts"][1]: torch.empty(metas[decode[k]["parts"][1]].shape,
                                                     dtype=metas[decode[k]["parts"][1]].torch_dtype,
                                                     device=storage[k].device) for k in fp8}
        dests = {decode[k]["parts"][0]: storage[k] for k in fp8} | scales
        stats.add(reader.read([metas[n] for n in dests], dests, **read_kw))
        for k in fp8:
            block = decode[k]["block"]
            apply_block_scales_(storage[k], scales[decode[k]["parts"][1]], tuple(block) if block else None)
    mx = sorted(k for k, d in decode.items() if d["method"] == "mxfp4")
    size = {k: sum(metas[n].length for n in decode[k]["parts"]) for k in mx}
    for batch in _batches(mx, size):
        temps = {n: torch.empty(metas[n].shape, dtype=metas[n].torch_dtype, device=storage[k].device)
                 for k in batch for n in decode[k]["parts"]}
        stats.add(reader.read([metas[n] for n in temps], temps, **read_kw))
        for k in batch:
            blocks, scales = (temps[n] for n in decode[k]["parts"])
            mxfp4_decode(blocks, scales, storage[k].dtype, out=storage[k])
        del temps
    return stats


class DecodedOnDemand(Mapping):
    """The tensors to write to the offload store: `ready` ones as they are, and each key of
    `shapes` (key -> (shape, dtype name)) read from its parts (`decode`: the stage's
    `StagePlan.decode`; `metas`: read items by name; `reader` reads them) and decoded when asked for —
    one at a time, so a disk tier's decoding needs one weight's memory, and none where the
    store already holds the entry. `bytes_read` counts the parts read."""

    def __init__(self, ready: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple],
                 decode: Mapping[str, dict], metas: Mapping[str, TensorMeta], *, reader: Reader,
                 progress: ReadProgress | None = None) -> None:
        self.ready, self.shapes, self.decode, self.metas = dict(ready), dict(shapes), decode, metas
        self.reader, self.progress = reader, progress
        self.bytes_read = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.ready:
            return self.ready[key]
        shape, dtype = self.shapes[key]
        out = {key: torch.empty(shape, dtype=getattr(torch, dtype))}
        parts = [self.metas[n] for n in self.decode[key]["parts"]]
        self.bytes_read += read_decoded(parts, out, {key: self.decode[key]}, reader=self.reader,
                                        progress=self.progress, workers=1).bytes_read
        return out[key]

    def __contains__(self, key: object) -> bool:   # without decoding (Mapping's would)
        return key in self.ready or key in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter([*self.ready, *(k for k in self.shapes if k not in self.ready)])

    def __len__(self) -> int:
        return len(set(self.ready) | set(self.shapes))
