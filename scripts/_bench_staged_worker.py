"""One rank of `scripts/bench_load.py --staged` (run under torchrun; not for users).

Each rank takes its stage's read items from the plan the driver computed, allocates its
destinations once and touches them (as a GPU's memory is allocated before the load: no
page faults in the timed reads), then, per mode (warm, cold) and repeat, times in one
process, in a rotating order, each of:

* ``staged``: `distload.io.read_tensors(..., staged=True)`, the GPU path minus the copy
  to the device: chunked preads into the staging buffer, copy into the destination; for
  every thread count and with and without O_DIRECT;
* ``raw``: dd-like: one thread, large buffered reads (the staging size) of the same byte
  ranges into one reused buffer: what the storage gives;
* ``raw_dest``: one thread, the same large reads straight into the destinations: the
  same bytes landing in this process's memory, with no staging copy (CPU only);
* ``copy``: one thread, no read: the rank's bytes copied (memmove) from one reused buffer
  of the staging size into the destinations — the staged path's extra work on the CPU,
  which a GPU's copy engine does instead (CPU only).

With ``--device cuda`` the destinations are on the rank's GPU and ``staged`` is the real
GPU path (pinned double-buffered staging, H2D copies on each thread's stream).

Before every measurement the ranks meet (so they read at once); in cold mode rank 0
first evicts the checkpoint's pages (`posix_fadvise(POSIX_FADV_DONTNEED)`, no root
needed) and records how much stayed resident. Writes ``OUT/rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distload.io import read_tensors
from distload.io.pagecache import evict, resident_fraction
from distload.plan.types import LoadPlan


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default="warm")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2,4,8")
    p.add_argument("--direct", default="off,on")
    p.add_argument("--staging-bytes", type=int, default=16 << 20)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args(argv)


def runs(reads) -> list[tuple[str, int, int]]:
    """The rank's byte ranges, neighbours merged: (file, start, end)."""
    out: list[list] = []
    for m in sorted(reads, key=lambda m: (m.file, m.offset)):
        if out and out[-1][0] == m.file and out[-1][2] == m.offset:
            out[-1][2] += m.length
        else:
            out.append([m.file, m.offset, m.offset + m.length])
    return [tuple(r) for r in out]


def raw_read(spans, buf: memoryview) -> int:
    """dd-like: large buffered reads of every span into one reused buffer."""
    done = 0
    for file, start, end in spans:
        fd = os.open(file, os.O_RDONLY)
        try:
            pos = start
            while pos < end:
                n = os.preadv(fd, [buf[:min(len(buf), end - pos)]], pos)
                if n <= 0:
                    raise EOFError(f"{file}: short read at {pos}")
                pos += n
        finally:
            os.close(fd)
        done += end - start
    return done


def raw_into_dests(reads, dests, chunk: int) -> int:
    """The same large reads, straight into the destinations (one thread, no staging)."""
    from distload.checkpoint.files import byte_view

    done = 0
    fds: dict[str, int] = {}
    try:
        for m in sorted(reads, key=lambda m: (m.file, m.offset)):
            if m.file not in fds:
                fds[m.file] = os.open(m.file, os.O_RDONLY)
            view = byte_view(dests[m.name])
            for begin in range(0, m.length, chunk):
                part = view[begin:begin + chunk]
                got = 0
                while got < len(part):
                    n = os.preadv(fds[m.file], [part[got:]], m.offset + begin + got)
                    if n <= 0:
                        raise EOFError(f"{m.file}: short read of {m.name}")
                    got += n
            done += m.length
    finally:
        for fd in fds.values():
            os.close(fd)
    return done


def bit_exact(reads, dests) -> bool:
    """The destinations (as the last staged read left them) equal safetensors' tensors."""
    from safetensors import safe_open

    by_file: dict[str, list] = {}
    for m in reads:
        by_file.setdefault(m.file, []).append(m.name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            if not all(torch.equal(f.get_tensor(n), dests[n].cpu()) for n in names):
                return False
    return True


def pinned_figures() -> dict:
    """torch's pinned host memory figures (peaks), where this torch reports them."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    try:
        return {k: v for k, v in (stats() if stats else {}).items() if "peak" in k or "current" in k}
    except RuntimeError:
        return {}


def copy_only(reads, dests, scratch: memoryview) -> int:
    """The staging copy alone: every tensor's bytes memmoved from `scratch` in pieces of
    its size, as the staged path copies them out of its buffer."""
    import ctypes

    src = ctypes.addressof(ctypes.c_char.from_buffer(scratch))
    done = 0
    for m in reads:
        base = dests[m.name].data_ptr()
        for begin in range(0, m.length, len(scratch)):
            ctypes.memmove(base + begin, src, min(len(scratch), m.length - begin))
        done += m.length
    return done


def main(argv=None) -> int:
    a = parse_args(argv)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plan = LoadPlan.from_json(Path(a.plan).read_text())
    reads = [m.located(a.ckpt) for m in plan.stage(rank).reads if m.length]
    device = torch.device("cpu")
    if a.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dests = {m.name: torch.empty(m.shape, dtype=m.torch_dtype, device=device) for m in reads}
    for t in dests.values():
        t.view(-1).view(torch.uint8).fill_(0)
    spans = runs(reads)
    scratch = mmap.mmap(-1, a.staging_bytes)
    scratch.write(b"\0" * a.staging_bytes)
    buf = memoryview(scratch)
    files = sorted(str(f) for f in Path(a.ckpt).glob("*.safetensors"))
    configs = [("raw", 1, False)] + ([("raw_dest", 1, False), ("copy", 1, False)] if device.type == "cpu" else [])
    configs += [("staged", int(t), d == "on") for t in a.threads.split(",") for d in a.direct.split(",")]
    results = []
    for mode in a.modes.split(","):
        if mode == "warm":
            raw_read(spans, buf)
        for rep in range(a.repeats):
            k = rep % len(configs)
            for system, threads, direct in configs[k:] + configs[:k]:
                resident = None
                if mode == "cold" and rank == 0:
                    for f in files:
                        evict(f)
                    resident = sum(resident_fraction(f) for f in files) / len(files)
                dist.barrier()
                load = os.getloadavg()[0]
                stats = None
                start = time.perf_counter()
                if system == "raw":
                    nbytes = raw_read(spans, buf)
                elif system == "raw_dest":
                    nbytes = raw_into_dests(reads, dests, a.staging_bytes)
                elif system == "copy":
                    nbytes = copy_only(reads, dests, buf)
                else:
                    stats = read_tensors(reads, dests, workers=threads, staging_bytes=a.staging_bytes,
                                         direct_io=direct, staged=device.type == "cpu")
                    nbytes = stats.bytes_read
                seconds = time.perf_counter() - start
                results.append({"mode": mode, "rep": rep, "system": system, "threads": threads,
                                "direct": direct, "seconds": seconds, "bytes": nbytes, "loadavg": load,
                                "resident_after_evict": resident,
                                **({"staging_bytes": stats.staging_bytes, "direct_files": stats.direct_files,
                                    "refused_files": stats.refused_files, "io_bytes": stats.io_bytes}
                                   if stats else {})})
    dist.barrier()
    for t in dests.values():   # a last staged read into zeroed destinations, checked
        t.view(-1).view(torch.uint8).fill_(0)
    read_tensors(reads, dests, workers=max(int(t) for t in a.threads.split(",")), staged=device.type == "cpu",
                 staging_bytes=a.staging_bytes, direct_io="on" in a.direct.split(","))
    out = {"results": results, "bit_exact": bit_exact(reads, dests), "stage_bytes": sum(m.length for m in reads),
           "device": str(device), "pinned": pinned_figures() if device.type == "cuda" else {}}
    Path(a.out, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
