"""The CLI: parse → init → plan → load → run → report.

    torchrun --nproc_per_node=2 -m distload.load --model PATH|ORG/NAME|demo [--report out.json]

(`distload/load.py` is the entry point; everything happens here.)
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from dataclasses import fields

from ..dist import agree_on_arguments, init_world, run_on_rank0, shutdown
from ..errors import DistloadError, RankError, UsageError
from ..loader import load, plan_job
from ..loader.api import versions
from ..log import logger, setup_logging
from ..pipeline.inputs import resolve_eos
from ..plan.explain import explain_plan
from .config import RunConfig, parse_args
from .exits import ERROR, OK, USAGE, Interrupted, install_signal_handlers, leave
from .prompts import collect_requests, left_pad, new_tokens, optional_tokenizer, write_outputs
from .table import format_table, write_report

__all__ = ["main", "run", "entry"]

# Flags that may differ between ranks: paths on each node, and how much a rank logs.
_PER_RANK_FLAGS = ("cache_dir", "offload_dir", "log_level", "read_workers")

DEMO_INPUT_IDS = ("1,15,27,300,42,7", "5,9,81,2")


def _generate(pipe, cfg: RunConfig) -> None:
    """Every rank: rank 0 collects the prompts (errors reach every rank), all generate,
    rank 0 logs and writes the outputs and the throughput."""
    demo_ids = DEMO_INPUT_IDS if cfg.model == "demo" and not (cfg.prompt or cfg.input_file) else ()
    rank0: dict = {}

    def collect():
        rank0["tokenizer"] = optional_tokenizer(pipe.root)
        return collect_requests(input_ids=cfg.input_ids or demo_ids, prompts=cfg.prompt,
                                input_file=cfg.input_file, model_dir=pipe.root,
                                tokenizer=rank0["tokenizer"])

    requests = run_on_rank0(pipe.world, collect)
    if not requests:
        return
    # As many prompts per call as the plan kept KV-cache room for (all, when not given);
    # when there are several calls, prompts of like length go together (less padding).
    chunk = cfg.max_batch_size or len(requests)
    order = list(range(len(requests)))
    if chunk < len(requests):
        order.sort(key=lambda i: len(requests[i].ids))
    outputs: list[list[int]] = [[] for _ in requests]
    eos, _ = resolve_eos(cfg.eos_token_id, None, pipe.plan.config)
    start = time.perf_counter()
    for first in range(0, len(order), chunk):
        batch = order[first:first + chunk]
        ids, mask = left_pad([requests[i].ids for i in batch])
        out = pipe.generate(ids, mask, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            seed=cfg.seed, eos_token_id=cfg.eos_token_id)
        if pipe.rank == 0:
            for i, row in zip(batch, out.tolist()):
                outputs[i] = new_tokens(row, ids.shape[1], eos)
            if chunk < len(requests):
                logger.info("%d of %d prompts done", first + len(batch), len(requests))
    seconds = time.perf_counter() - start

    def finish() -> None:  # rank 0; a failure here (a full disk) reaches every rank
        tokenizer = rank0["tokenizer"]
        if not cfg.output_file or len(requests) <= 16:  # a big batch job speaks through its file
            for request, generated in zip(requests, outputs):
                shown = repr(tokenizer.decode(generated)) if tokenizer is not None else generated
                logger.info("%s -> %s", list(request.ids), shown)
        if cfg.output_file:
            write_outputs(cfg.output_file, requests, outputs, tokenizer)
            logger.info("outputs written to %s", cfg.output_file)
        count = sum(len(g) for g in outputs)
        logger.info("generated %d tokens for %d prompts in %.3f s (%.1f tokens/s)", count,
                    len(requests), seconds, count / seconds)

    run_on_rank0(pipe.world, finish, what="writing the outputs")


def _explain(cfg: RunConfig, world) -> int:
    """--explain: every rank takes part in planning (each measures its own memory); rank 0
    writes the plan to stdout; nothing is loaded."""
    plan = plan_job(cfg.model, world=world, dtype=cfg.dtype, max_memory=cfg.memory_limits,
                    strict=cfg.strict, cache_dir=cfg.cache_dir, offload_dir=cfg.offload_dir,
                    max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_seq_len,
                    workload="generate")
    if world.is_first:
        sys.stdout.write(explain_plan(plan))
        sys.stdout.flush()
    shutdown(world)
    return OK


def _flags(cfg: RunConfig) -> dict:
    """The command line as rank 0 must agree with it (``--flag``: value), and versions."""
    flags = {"--" + f.name.replace("_", "-"): getattr(cfg, f.name) for f in fields(cfg)
             if f.metadata.get("flag") is not False and f.name not in _PER_RANK_FLAGS}
    return {**flags, **versions()}


def run(cfg: RunConfig) -> int:
    """Every rank: the whole run of one command line; raises on any failure."""
    world = init_world(timeout_s=cfg.timeout, device=cfg.device)
    agree_on_arguments(world, _flags(cfg))
    if cfg.explain:
        return _explain(cfg, world)
    pipe = load(cfg.model, dtype=cfg.dtype, strict=cfg.strict, cache_dir=cfg.cache_dir,
                offload_dir=cfg.offload_dir, device=cfg.device, timeout_s=cfg.timeout,
                read_workers=cfg.read_workers, micro_batches=cfg.micro_batches,
                max_memory=cfg.memory_limits, max_batch_size=cfg.max_batch_size,
                max_seq_len=cfg.max_seq_len, world=world, workload="generate")  # the CLI generates

    def report() -> None:  # rank 0; a failure here reaches every rank
        logger.info("loaded %s\n%s", pipe.plan.label, format_table(pipe.job_report))
        if cfg.report:
            write_report(pipe.job_report, cfg.report)
            logger.info("report written to %s", cfg.report)

    run_on_rank0(world, report, what="writing the report")
    if cfg.max_new_tokens:
        _generate(pipe, cfg)
    shutdown(world)
    return OK


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return its exit code (see `distload.cli.exits`). Every rank logs one
    line for a failure — no traceback unless ``--log-level DEBUG``."""
    install_signal_handlers()
    try:
        cfg = parse_args(argv)
    except SystemExit as e:  # argparse: usage printed, or --help
        return e.code if isinstance(e.code, int) else USAGE
    except Interrupted as e:
        return e.exit_code
    setup_logging(cfg.log_level.upper())
    try:
        return run(cfg)
    except Interrupted as e:
        code = e.exit_code
        _ignore_signals()
        logger.warning("%s: stopping", e)
    except UsageError as e:
        code = USAGE
        logger.error("%s", e)
    except RankError as e:  # another rank failed; it printed its own error
        code = ERROR
        logger.error("%s", e)
    except (DistloadError, ValueError, OSError) as e:
        code = ERROR
        logger.error("%s: %s", type(e).__name__, e)
    except Exception as e:  # noqa: BLE001 - an unexpected failure still stops this rank cleanly
        code = ERROR
        logger.error("unexpected failure: %s: %s (--log-level DEBUG shows where)", type(e).__name__, e)
        logger.debug("%s", traceback.format_exc())
    try:
        shutdown(failed=True)
    except Interrupted:
        pass
    return code


def _ignore_signals() -> None:
    """A second Ctrl-C (or torchrun forwarding the first) must not interrupt the stop."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def entry(argv: list[str] | None = None) -> None:
    """The process's entry point (``distload``, ``python -m distload.load``): run, then
    leave with the exit code at once (`distload.cli.exits.leave`)."""
    leave(main(argv))
