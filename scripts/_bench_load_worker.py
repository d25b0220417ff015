"""One rank of one system of `scripts/bench_load.py` (run under torchrun; not for users).

Every rank measures one load of one system and writes its figures to
``OUT/rank<R>.json``. The systems, one function each:

* ``distload``:   `distload.load(CKPT, device="cpu")`.
* ``dcp``:        `torch.distributed.checkpoint.load` of this rank's stage keys (from the
                  plan the driver computed) with `HuggingFaceStorageReader`, `no_dist=True`.
* ``accelerate``: `init_empty_weights` + `AutoModelForCausalLM.from_config`, then
                  `accelerate.load_checkpoint_and_dispatch(model, CKPT, device_map={"": "cpu"})`
                  (every rank loads the whole model, as users run it under torchrun today).
* ``raw``:        plain `readinto` of this rank's byte ranges, one anonymous-mmap buffer per
                  tensor: the floor.

Shared figures: seconds of the timed call, `rchar` of /proc/self/io around it (what the
process asked `read`-like syscalls for; reads through a memory map are invisible to it),
the tensor bytes the system materialized, and the peak growth of RSS, anonymous RSS
and (with ``--uss``) USS, sampled by a thread every ``--interval-ms``, minus the values
just before the call.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

SYSTEMS = ("distload", "dcp", "accelerate", "raw")


# ----------------------------------------------------------------------------- shared helpers

def rchar() -> int:
    """Bytes this process (all its threads) asked read-like syscalls for, so far."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


_PAGE = os.sysconf("SC_PAGE_SIZE")


def statm() -> dict[str, int]:
    """Resident bytes (all, and anonymous = resident - file/shmem-backed) from
    /proc/self/statm: kernel counters, cheap to read however large the process."""
    with open("/proc/self/statm") as f:
        _, resident, shared = (int(x) for x in f.read().split()[:3])
    return {"rss": resident * _PAGE, "anon": (resident - shared) * _PAGE}


class PeakMemory:
    """Peak growth, while active, of this process's resident memory: RSS (counts mapped
    file pages too, shared or not), anonymous RSS, and, with `uss`, the unique set size
    (private memory, psutil's `memory_full_info().uss`).

    The baselines are taken on entry; a daemon thread samples every `interval` seconds
    and a last sample is taken on exit. USS comes from /proc/self/smaps_rollup, which
    walks the page tables: on a 2-CPU machine each sample takes tens of milliseconds and
    slows a concurrent load by ~40%, so timed runs leave it off and the benchmark takes
    USS in separate memory runs."""

    def __init__(self, interval: float = 0.01, *, uss: bool = False):
        self.interval, self.uss = interval, uss
        self._proc = psutil.Process()
        self.base: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, int]:
        out = statm()
        if self.uss:
            out["uss"] = self._proc.memory_full_info().uss
        return out

    def _sample(self) -> None:
        for k, v in self._read().items():
            self.peak[k] = max(self.peak[k], v)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self.base = self._read()
        self.peak = dict(self.base)
        self._thread = threading.Thread(target=self._loop, name="bench-mem", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def growth(self) -> dict[str, int]:
        """{"rss_growth", "anon_growth"[, "uss_growth"]}: peak minus baseline."""
        return {f"{k}_growth": self.peak[k] - self.base[k] for k in self.base}


@contextmanager
def measured(result: dict, a, *, key: str = "seconds"):
    """Time the body into `result[key]`; add the rchar delta and peak memory growth."""
    with PeakMemory(a.interval, uss=a.uss) as mem:
        read0 = rchar()
        start = time.perf_counter()
        yield
        result[key] = time.perf_counter() - start
        result["rchar"] = rchar() - read0
    result.update(mem.growth(), memory_samples=mem.samples)


def tensor_nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def stage_reads(plan_path: str, rank: int, root: str | None = None):
    """Rank `rank`'s read items of the saved plan (files relative to the checkpoint, or
    located under `root`)."""
    from distload.plan.types import LoadPlan

    reads = LoadPlan.from_json(Path(plan_path).read_text()).stage(rank).reads
    return reads if root is None else tuple(m.located(root) for m in reads)


def init_gloo():
    """Join the job (gloo) so ranks start their timed call together."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    return dist


# ----------------------------------------------------------------------------- systems

def bench_distload(a, rank: int) -> dict:
    import torch.distributed as dist

    import distload

    result: dict = {}
    with measured(result, a, key="wall_seconds"):
        pipe = distload.load(a.ckpt, device="cpu")
    expected = {m.name for m in stage_reads(a.plan, rank)}
    result.update(seconds=pipe.report["load_seconds"], bytes_read=pipe.report["bytes_read"],
                  materialized=tensor_nbytes(pipe.module.parameters()),
                  plan_matches={m.name for m in pipe.plan.stage(rank).reads} == expected)
    dist.barrier()
    dist.destroy_process_group()
    return result


def bench_dcp(a, rank: int) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp
    import safetensors  # noqa: F401 - imported before timing (the reader imports it lazily)

    dist = init_gloo()
    reads = stage_reads(a.plan, rank)
    state = {m.name: torch.empty(m.shape, dtype=m.torch_dtype) for m in reads}  # pages: on first touch
    result: dict = {}
    with measured(result, a):
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(a.ckpt), no_dist=True)
    result["materialized"] = tensor_nbytes(state.values())
    dist.barrier()
    dist.destroy_process_group()
    return result


def bench_accelerate(a, rank: int) -> dict:
    import accelerate
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dist = init_gloo()
    result: dict = {}
    start = time.perf_counter()
    config = AutoConfig.from_pretrained(a.ckpt)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result["build_seconds"] = time.perf_counter() - start
    dist.barrier()
    with measured(result, a):
        model = accelerate.load_checkpoint_and_dispatch(model, a.ckpt, device_map={"": "cpu"})
    result["materialized"] = tensor_nbytes(model.parameters())
    # Its weights are views of safetensors' file mappings: nothing was read yet. Time the
    # deferred part, one byte per 4 KiB page (what the first forward would pay).
    start = time.perf_counter()
    for p in model.parameters():
        p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
    result["first_touch_seconds"] = time.perf_counter() - start
    dist.barrier()
    dist.destroy_process_group()
    return result


def bench_raw(a, rank: int) -> dict:
    dist = init_gloo()
    reads = sorted(stage_reads(a.plan, rank, a.ckpt), key=lambda m: (m.file, m.offset))
    buffers = [mmap.mmap(-1, m.length) for m in reads]  # anonymous: pages come on first touch
    result: dict = {}
    with measured(result, a):
        handles: dict = {}
        try:
            for meta, buf in zip(reads, buffers):
                if meta.file not in handles:
                    handles[meta.file] = open(meta.file, "rb", buffering=0)
                f = handles[meta.file]
                f.seek(meta.offset)
                view, done = memoryview(buf), 0
                while done < meta.length:
                    n = f.readinto(view[done:])
                    if not n:
                        raise EOFError(f"{meta.file}: short read of {meta.name}")
                    done += n
        finally:
            for f in handles.values():
                f.close()
    result["materialized"] = sum(len(b) for b in buffers)
    dist.barrier()
    dist.destroy_process_group()
    return result


BENCH = {"distload": bench_distload, "dcp": bench_dcp, "accelerate": bench_accelerate, "raw": bench_raw}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--plan", required=True, help="LoadPlan JSON the driver computed")
    p.add_argument("--out", required=True, help="directory for rank<R>.json")
    p.add_argument("--interval-ms", type=float, default=10.0)
    p.add_argument("--uss", action="store_true", help="also sample USS (slow: memory runs only)")
    a = p.parse_args(argv)
    a.interval = a.interval_ms / 1000
    rank = int(os.environ.get("RANK", "0"))
    result = BENCH[a.system](a, rank)
    result.update(system=a.system, rank=rank, pid=os.getpid())
    Path(a.out, f"rank{rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
