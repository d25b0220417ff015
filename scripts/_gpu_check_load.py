"""One rank of `scripts/gpu_check.sh`'s load step (under torchrun, one rank per GPU; not
for users): `distload.load(CKPT)` onto this rank's GPU, then every parameter of its stage
checked bit for bit against safetensors' own reader. Writes ``OUT/load-<LABEL>-rank<R>.json``
with the rank's load figures (seconds, bytes, GB/s, staging and pinned memory) and the
check's result.

    torchrun --nproc_per_node=NGPU scripts/_gpu_check_load.py CKPT OUT LABEL [--direct-io] [--read-workers N]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from safetensors import safe_open

import distload


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("label")
    p.add_argument("--direct-io", action="store_true")
    p.add_argument("--read-workers", type=int, default=4)
    p.add_argument("--staging-size", default="16MiB")
    p.add_argument("--device", default=None, help="cpu: a dry run of the plumbing on CPU ranks")
    a = p.parse_args()
    pipe = distload.load(a.ckpt, read_workers=a.read_workers, direct_io=a.direct_io,
                         staging_bytes=a.staging_size, device=a.device)
    rank, report = pipe.rank, pipe.report
    located = {m.name: m.located(pipe.root) for m in pipe.plan.stage(rank).reads}
    handles, mismatches, checked = {}, [], 0
    for src in pipe.plan.stage(rank).params:
        meta = located.get(src.key)
        if meta is None:            # a tied tensor received from another rank
            continue
        if meta.file not in handles:
            handles[meta.file] = safe_open(meta.file, framework="pt")
        mine = pipe.module.get_parameter(src.param)
        checked += 1
        if not torch.equal(mine.detach().cpu(), handles[meta.file].get_tensor(src.key)):
            mismatches.append(src.param)
    host = getattr(torch.cuda, "host_memory_stats", None)
    try:
        pinned = {k: v for k, v in host().items() if "peak" in k} if host else {}
    except RuntimeError:
        pinned = {}
    seconds = report["load_seconds"]
    out = {"rank": rank, "label": a.label, "device": str(pipe.device), "world_size": pipe.world.world_size,
           "backend": dist.get_backend() if dist.is_initialized() else "none (one rank)",
           "load_seconds": seconds, "bytes_read": report["bytes_read"],
           "gbps": report["bytes_read"] / seconds / 1e9 if seconds else None,
           "staging_bytes": report.get("staging_bytes"), "direct_io_files": report.get("direct_io_files"),
           "direct_io_refused_files": report.get("direct_io_refused_files"), "pinned": pinned,
           "gpu_peak_bytes": torch.cuda.max_memory_allocated(pipe.device),
           "checked": checked, "mismatches": mismatches[:5], "bit_exact": checked > 0 and not mismatches,
           "read_workers": a.read_workers, "direct_io": a.direct_io}
    with open(os.path.join(a.out, f"load-{a.label}-rank{rank}.json"), "w") as f:
        json.dump(out, f)
    distload.dist.shutdown(pipe.world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
