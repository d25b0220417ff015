"""`distload.load` and `distload.plan_job`: the whole per-rank flow behind one call (see
DESIGN.md) — init the world, plan on rank 0, fetch this node's files, `load_stage`, and
hand back the rank's `Pipeline`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..dist import DEFAULT_TIMEOUT_S, World, agree, agree_on_arguments, gather_objects, init_world, run_on_rank0
from ..checkpoint.dtypes import normalize_dtype
from ..errors import PlanError
from ..io import DEFAULT_READ_WORKERS, DEFAULT_STAGING_BYTES, ReadOptions
from ..log import logger
from ..offload import default_offload_dir
from ..pipeline import CallChannel, Pipeline
from ..plan.budget import parse_max_memory, parse_size
from ..plan.types import LoadPlan
from ..sources import Source, open_source
from .fetch import fetch_node_files
from .memory import measure_local
from .prepare import PlanRequest, plan_load
from .report import PhaseClock, job_report, versions
from .stage import load_stage

__all__ = ["load", "plan_job", "fetch_node_files", "versions"]


def plan_job(model: str = "demo", *, world: World | None = None, dtype: torch.dtype | str | None = None,
             max_memory=None, strict: bool = True, cache_dir: str | None = None,
             offload_dir: str | None = None, max_batch_size: int | None = None,
             max_seq_len: int | None = None, device: str | None = None,
             timeout_s: float = DEFAULT_TIMEOUT_S, source: Source | None = None,
             workload: str = "generate") -> LoadPlan:
    """The plan every rank will follow, without loading anything (what ``--explain``
    shows, and the `pipe.plan` of a `load` with the same arguments). Every rank calls it:
    each measures its own memory (its own GPU only), rank 0 gathers those, resolves them
    with `max_memory` (see `distload.plan.budget`) and plans; every rank receives the same
    plan and checks its digest. `workload` says what to keep device room for, for
    batches of `max_batch_size` sequences of `max_seq_len` tokens: ``"generate"`` (the
    default: KV cache, activations, the head's logits for the last position only, as
    `Pipeline.generate` makes them), ``"forward"`` (full-sequence logits of such a batch,
    as `Pipeline.forward` returns them, no KV cache) or ``"any"`` (both).

    Example::

        plan = distload.plan_job("./llama", max_memory={0: "20GiB", 1: "20GiB", "cpu": "64GiB"})
        print(explain_plan(plan))
    """
    world = world or init_world(timeout_s=timeout_s, device=device)
    agree_on_arguments(world, {"model": model, "dtype": dtype, "max_memory": max_memory,
                               "strict": strict, "max_batch_size": max_batch_size,
                               "max_seq_len": max_seq_len, "workload": workload, **versions()})
    limits = parse_max_memory(max_memory)  # a bad entry fails here, on every rank alike
    # RAM and disk are per node, shared by its ranks: as many as the world says are on it
    mine = measure_local(world.device, offload_dir=offload_dir or default_offload_dir(cache_dir),
                         local_world_size=len(world.node_ranks()))
    measured = tuple(gather_objects(world, mine))
    request = PlanRequest(model=model, world_size=world.world_size, dtype=normalize_dtype(dtype),
                          strict=strict, cache_dir=cache_dir, max_memory=limits, measured=measured,
                          max_batch_size=max_batch_size, max_seq_len=max_seq_len, workload=workload)

    def plan_on_rank0() -> tuple[str, str]:
        plan = plan_load(request, source)
        return plan.to_json(), plan.digest()

    text, digest = run_on_rank0(world, plan_on_rank0)
    plan = LoadPlan.from_json(text)
    if plan.digest() != digest:
        raise PlanError(f"rank {world.rank} received a plan whose digest differs from rank 0's")
    return plan


def load(model: str = "demo", *, dtype: torch.dtype | str | None = None, max_memory=None,
         offload_dir: str | None = None, micro_batches: int | None = None, strict: bool = True,
         cache_dir: str | None = None, device: str | None = None, timeout_s: float | None = None,
         read_workers: int = DEFAULT_READ_WORKERS, max_batch_size: int | None = None,
         max_seq_len: int | None = None, world: World | None = None,
         workload: str = "generate", direct_io: bool = False,
         staging_bytes: int | str | None = None, read_options: ReadOptions | None = None,
         before_read: Callable[[LoadPlan, str], None] | None = None,
         verify_checksums: bool = False) -> Pipeline:
    """Load `model` (a local directory or file, a hub id ``org/name``, or ``"demo"``)
    across the ranks torchrun started — or in this one process — and return this rank's
    `Pipeline`. Every rank calls it with the same arguments.

    Rank 0 plans (see `plan_job`: `max_memory` budgets, room kept for `max_batch_size`
    sequences of `max_seq_len` tokens of the `workload`: ``"generate"`` by default; say
    ``"forward"`` or ``"any"`` to keep room for full-sequence logits of such a batch);
    each rank reads only its own stage's byte ranges.
    Units the plan puts on the disk tier go to `offload_dir` (default ``<cache>/offload``,
    see `distload.offload`) and are streamed onto the device while they run.

    How each rank reads (`distload.io.ReadOptions`: node-local, may differ between ranks;
    the source's reader executes them): `read_workers` threads,
    reads and staging buffers of `staging_bytes` (``"16MiB"`` by default; pinned and
    doubled per thread on CUDA), and `direct_io` (O_DIRECT where the filesystem allows
    it: no page cache, for cold loads; CPU ranks then read instead of mapping pages).
    `read_options`, when given, is all of them at once (the CLI's: every `ReadOptions`
    field, a reader's own included) and replaces those three.

    The ranks wait for each other within the load as long as its bytes need
    (`distload.loader.waits`), or `timeout_s`, which also bounds every wait in a call
    (default `distload.dist.DEFAULT_TIMEOUT_S`, 600 s). `before_read(plan, root)` runs on
    rank 0 once the plan is made and the files are on its node, before any weight is read
    (the CLI checks its prompts against the model there); its error stops every rank.

    `verify_checksums`: each node's leader hashes the files its ranks read before they
    read them, against the hub's sha256 (a hub id) or a manifest written on the first
    such load (a local checkpoint); see `distload.sources.checksums`.

    Every rank checks that its arguments (and distload and torch versions) are rank 0's;
    only the node-local paths `cache_dir` and `offload_dir` and the read settings above
    may differ. `world` is the job already joined (`distload.dist.init_world`), if any.

    Example::

        pipe = distload.load("./llama-dir", dtype="bfloat16")
        pipe.report["bytes_read"], pipe.module, pipe.job_report
    """
    options = read_options if read_options is not None else ReadOptions(
        workers=read_workers, direct_io=direct_io,
        staging_bytes=DEFAULT_STAGING_BYTES if staging_bytes is None else parse_size(staging_bytes))
    world = world or init_world(timeout_s=timeout_s or DEFAULT_TIMEOUT_S, device=device)
    agree_on_arguments(world, {"micro_batches": micro_batches, "device": device,
                               "timeout_s": timeout_s, "verify_checksums": verify_checksums})
    source, error = None, None
    try:  # a path one node lacks fails there; every rank must hear of it
        source = open_source(model, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001
        error = exc
    agree(world, error, what="opening the checkpoint")
    clock = PhaseClock()
    with clock("plan"):
        plan = plan_job(model, world=world, dtype=dtype, max_memory=max_memory, strict=strict,
                        cache_dir=cache_dir, offload_dir=offload_dir, max_batch_size=max_batch_size,
                        max_seq_len=max_seq_len, source=source, workload=workload)
    if world.is_first and plan.unexpected_keys:
        logger.warning("ignoring %d unexpected checkpoint key(s): %s", len(plan.unexpected_keys),
                       ", ".join(plan.unexpected_keys[:8]))
    with clock("fetch"):
        root, fetched = fetch_node_files(world, source, plan, timeout_s=timeout_s or DEFAULT_TIMEOUT_S,
                                         verify_checksums=verify_checksums)
    if before_read is not None:
        run_on_rank0(world, lambda: before_read(plan, root))
    stage = load_stage(plan, world, reader=source.reader(options), offload_dir=offload_dir,
                       cache_dir=cache_dir, timeout_s=timeout_s)
    stage.report["fetched_bytes"] = fetched   # the node's download, on its leader's row
    everyone = job_report(plan, gather_objects(world, stage.report), world=world, phases=clock.seconds)
    everyone["ranks"][world.rank] = stage.report   # this rank's row stays current (`pipeline.figures`)
    return Pipeline(module=stage.module, plan=plan, report=stage.report, job_report=everyone,
                    world=world, root=root, micro_batches=micro_batches,
                    calls=CallChannel.open(world))
