"""The CLI: parse → init → plan → load → run → report.

    torchrun --nproc_per_node=2 -m distload.load --model PATH|ORG/NAME|demo [--report out.json]

(`distload/load.py` is the entry point; everything happens here.)
"""

from __future__ import annotations

import re
import signal
import sys
import time
import traceback
from dataclasses import fields

import torch.distributed

from .. import trace
from ..dist import (DEFAULT_TIMEOUT_S, World, agree_on_arguments, dead_peers, init_world, note_leaving,
                    peers_gone, run_on_rank0, shutdown)
from ..errors import DistloadError, RankError, UsageError
from ..launch.errorfile import record_error
from ..loader import load, plan_job
from ..loader.report import versions
from ..loader.tracing import write_job_trace, write_own_trace
from ..log import logger, setup_logging
from ..pipeline.inputs import resolve_eos
from ..plan.explain import explain_plan
from ..plan.reserve import config_value
from .config import RunConfig, flag_of, parse_args
from .exits import ERROR, INTERRUPTED, OK, TERMINATED, USAGE, Interrupted, install_signal_handlers, leave
from .prompts import (format_result, left_pad, new_tokens, optional_tokenizer, prepare_requests,
                      read_prompts, write_outputs)
from .table import format_generation, format_offload_waits, format_table, write_report

__all__ = ["main", "run", "entry"]

# Flags that may differ between ranks: paths on each node and how much a rank logs. The
# reader's options may too: node-local, they are `cfg.read_options` (flag False), never
# compared (declared once: `distload.io.ReadOptions`).
_PER_RANK_FLAGS = ("cache_dir", "offload_dir", "log_level")

DEMO_INPUT_IDS = ("1,15,27,300,42,7", "5,9,81,2")


class _Prompts:
    """Rank 0's prompts, checked before any weight is read: their form when the job starts
    (`read`), then against the model's config once the plan is made (`check`, the load's
    ``before_read``). A bad one stops every rank (`UsageError`, naming it)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.prompts: list = []
        self.requests: list = []
        self.tokenizer = None

    def read(self) -> int:
        cfg = self.cfg
        demo = cfg.model == "demo" and not (cfg.input_ids or cfg.prompt or cfg.input_file)
        try:
            self.prompts = read_prompts(input_ids=DEMO_INPUT_IDS if demo else cfg.input_ids,
                                        prompts=cfg.prompt, input_file=cfg.input_file)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if demo:   # say what the demo generates from, and how to give it other prompts
            logger.info("demo prompts (token ids): %s; give your own with --input-ids or --prompt",
                        "; ".join(DEMO_INPUT_IDS))
        return len(self.prompts)

    def check(self, plan, root: str) -> None:
        config = plan.config
        self.tokenizer = optional_tokenizer(root)
        try:
            self.requests, notes = prepare_requests(
                self.prompts, model_dir=root, tokenizer=self.tokenizer,
                vocab_size=config.get("vocab_size"), context=config_value(config, "max_position_embeddings"),
                max_new_tokens=self.cfg.max_new_tokens)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        for note in notes:
            logger.warning("%s", note)


def _generate(pipe, cfg: RunConfig, prompts: _Prompts) -> dict:
    """Every rank generates; rank 0 writes the results (stdout, or --output-file; a failure
    there reaches every rank) and returns the generation's figures for the report
    (elsewhere {})."""
    requests = prompts.requests
    count = run_on_rank0(pipe.world, lambda: len(requests))
    if not count:
        return {}
    # As many prompts per call as the plan kept KV-cache room for (all, when not given);
    # when there are several calls, prompts of like length go together (less padding).
    chunk = cfg.max_batch_size or count
    order = list(range(count))
    if chunk < count and pipe.rank == 0:
        order.sort(key=lambda i: len(requests[i].ids))
    outputs: list[list[int]] = [[] for _ in range(count)]
    eos, _ = resolve_eos(cfg.eos_token_id, None, pipe.plan.config)
    calls = []
    start = time.perf_counter()
    for first in range(0, count, chunk):
        batch = order[first:first + chunk]
        ids = mask = None
        if pipe.rank == 0:
            ids, mask = left_pad([requests[i].ids for i in batch])
        out = pipe.generate(ids, mask, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                            temperature=cfg.sampling_temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            seed=cfg.seed, eos_token_id=cfg.eos_token_id)
        if pipe.rank == 0:
            calls.append(dict(pipe.last_call))
            for i, row in zip(batch, out.tolist()):
                outputs[i] = new_tokens(row, ids.shape[1], eos)
            if chunk < count:
                logger.info("%d of %d prompts done", first + len(batch), count)
    seconds = time.perf_counter() - start

    def finish() -> dict:  # rank 0; a failure here (a full disk) reaches every rank
        if cfg.output_file:
            write_outputs(cfg.output_file, requests, outputs, prompts.tokenizer)
            if cfg.output_file != "-":
                logger.info("outputs written to %s", cfg.output_file)
        else:  # results go to stdout, one line per prompt; logs stay on stderr
            sys.stdout.write("".join(format_result(g, prompts.tokenizer) + "\n" for g in outputs))
            sys.stdout.flush()
        return _generation_figures(calls, prompts=count, generated=sum(len(g) for g in outputs),
                                   seconds=seconds)

    figures = run_on_rank0(pipe.world, finish, what="writing the outputs")
    return figures if pipe.rank == 0 else {}


def _no_outputs(cfg: RunConfig) -> None:
    """Rank 0, when nothing was generated (no prompt in --input-file, or
    --max-new-tokens 0): --output-file is written empty, never left with an earlier run's
    results."""
    if cfg.max_new_tokens > 0:
        logger.warning("no prompts in %s: nothing to generate", cfg.input_file or "the input")
    write_outputs(cfg.output_file, [], [])
    if cfg.output_file != "-":
        logger.info("outputs written to %s (empty)", cfg.output_file)


def _generation_figures(calls: list[dict], *, prompts: int, generated: int, seconds: float) -> dict:
    """The report's ``generation``: over every `generate` call of the run (see
    `Pipeline.last_call`)."""
    def total(key: str) -> float:
        return sum(c.get(key, 0) for c in calls)

    prefill_s, decode_s = total("prefill_seconds"), total("decode_seconds")
    return {
        "prompts": prompts, "generated_tokens": generated, "seconds": round(seconds, 6),
        "tokens_per_second": round(generated / seconds, 3) if seconds > 0 else None,
        "time_to_first_token_seconds": calls[0].get("time_to_first_token_seconds") if calls else None,
        "prompt_tokens": int(total("prompt_tokens")),
        "prefill_tokens_per_second": round(total("prompt_tokens") / prefill_s, 3) if prefill_s > 0 else None,
        "decode_tokens": int(total("decode_tokens")),
        "decode_tokens_per_second": round(total("decode_tokens") / decode_s, 3) if decode_s > 0 else None,
    }


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
    flags = {flag_of(f): getattr(cfg, f.name) for f in fields(cfg)
             if f.metadata.get("flag") is not False and f.name not in _PER_RANK_FLAGS}
    return {**flags, **versions()}


def _load_and_run(cfg: RunConfig, world: World) -> int:
    prompts = _Prompts(cfg)
    generating = cfg.max_new_tokens > 0 and run_on_rank0(world, prompts.read, what="reading the prompts") > 0
    pipe = load(cfg.model, dtype=cfg.dtype, strict=cfg.strict, cache_dir=cfg.cache_dir,
                offload_dir=cfg.offload_dir, device=cfg.device, timeout_s=cfg.timeout_s,
                read_options=cfg.read_options, micro_batches=cfg.micro_batches,
                max_memory=cfg.memory_limits, max_batch_size=cfg.max_batch_size,
                max_seq_len=cfg.max_seq_len, world=world, workload="generate",  # the CLI generates
                before_read=prompts.check if generating else None,
                verify_checksums=cfg.verify_checksums)
    report = pipe.job_report
    if cfg.model == "demo" and world.is_first:   # every run: where the demo's files are
        logger.info("demo checkpoint: %s", pipe.root)

    def write() -> None:  # rank 0; a failure here reaches every rank
        logger.info("loaded %s\n%s", pipe.plan.label, format_table(report))
        if cfg.report:
            write_report(report, cfg.report)
            logger.info("report written to %s", cfg.report)

    run_on_rank0(world, write, what="writing the report")
    if not generating and cfg.output_file:
        run_on_rank0(world, lambda: _no_outputs(cfg), what="writing the outputs")
    if generating:
        figures = _generate(pipe, cfg, prompts)

        def add_figures() -> None:  # rank 0: the report again, with the generation's figures
            report["generation"] = figures
            report["phases"]["first_forward_seconds"] = figures["time_to_first_token_seconds"]
            logger.info("%s", format_generation(figures))
            if waits := format_offload_waits(report):   # current now: after the calls
                logger.info("%s", waits)
            if cfg.report:
                write_report(report, cfg.report)

        run_on_rank0(world, add_figures, what="writing the report")
    if cfg.trace:
        write_job_trace(world, cfg.trace)
    shutdown(world)
    return OK


def run(cfg: RunConfig) -> int:
    """Every rank: the whole run of one command line; raises on any failure."""
    world = init_world(timeout_s=cfg.timeout_s or DEFAULT_TIMEOUT_S, device=cfg.device)
    agree_on_arguments(world, _flags(cfg))
    if world.is_first:
        for note in cfg.warnings():
            logger.warning("%s", note)
    if cfg.explain:
        return _explain(cfg, world)
    if not cfg.trace:
        return _load_and_run(cfg, world)
    trace.enable()
    try:
        return _load_and_run(cfg, world)
    except BaseException:  # what rank 0 recorded up to the failure, without a collective
        try:
            write_own_trace(world, cfg.trace)
        except Exception as exc:  # noqa: BLE001 - the failure itself matters more
            logger.debug("could not write the trace: %s", exc)
        raise
    finally:
        trace.disable()


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
    relayed = quiet = False
    try:
        return run(cfg)
    except Interrupted as e:
        _ignore_signals()
        dead = dead_peers()
        if not dead:
            line = f"{e}: stopping"
            logger.warning("%s", line)
            record_error(line, relayed=False)   # for torchrun's summary and distload.launch
            note_leaving(str(e), signal.Signals(e.signum).name)
            return _leave_group(e.exit_code)
        # a launcher stops the others when a rank dies: the death is the cause
        cause, relayed = "RankError", True
        line = (f"rank {', '.join(map(str, dead))} died (connection lost); "
                f"stopping ({signal.Signals(e.signum).name} from the launcher)")
    except UsageError as e:
        cause, line = "UsageError", _as_flags(str(e))
    except RankError as e:  # another rank failed: this one exits with that cause's code
        cause, line, relayed = e.cause, _as_flags(str(e)), True
    except (DistloadError, ValueError, OSError) as e:
        cause, line = type(e).__name__, _as_flags(f"{type(e).__name__}: {e}")
        # a job-wide error (every rank's the same, see `agree`): rank 0 speaks for the job
        quiet = getattr(e, "rank0_speaks", False)
    except torch.distributed.DistNetworkError as e:  # the job's store is gone with its host
        logger.debug("%s", e)
        line = ("rank 0 died (connection lost); it held the job's store" if peers_gone([0]) else
                "lost the job's store: its host (the launcher, or rank 0 when ranks are started by hand) "
                "died or stopped")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        logger.error("%s", line)
        record_error(line, relayed=True)
        return _leave_group(ERROR)      # no note: there is no store to leave it on
    except Exception as e:  # noqa: BLE001 - an unexpected failure still stops this rank cleanly
        cause = type(e).__name__
        line = f"unexpected failure: {type(e).__name__}: {e} (--log-level DEBUG shows where)"
        logger.debug("%s", traceback.format_exc())
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the launcher's, as it stops the job: the line stands
    (logger.debug if quiet else logger.error)("%s", line)
    record_error(line, relayed=relayed)   # for torchrun's summary and distload.launch
    try:
        note_leaving(line, cause)
    except Interrupted:   # a Ctrl-C now: the line is out, leave as planned
        pass
    return _leave_group(_CODES.get(cause, ERROR))


# The exit code of a failure by its cause, the same on every rank (a rank that learns of
# another's failure exits with that failure's code).
_CODES = {"UsageError": USAGE, "SIGINT": INTERRUPTED, "SIGTERM": TERMINATED}


def _leave_group(code: int) -> int:
    try:
        shutdown(failed=True)
    except Interrupted:
        pass
    return code


def _as_flags(message: str) -> str:
    """The library's messages name the Python API's keywords (``max_batch_size=``); the CLI
    names its flags (``--max-batch-size``)."""
    for f in fields(RunConfig):
        if f.metadata.get("flag") is not False:
            message = re.sub(rf"\b{f.name}=(?=\W|$)", "--" + f.name.replace("_", "-"), message)
    return message


def _ignore_signals() -> None:
    """A second Ctrl-C (or torchrun forwarding the first) must not interrupt the stop."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def entry(argv: list[str] | None = None) -> None:
    """The process's entry point (``distload``, ``python -m distload.load``): run, then
    leave with the exit code at once (`distload.cli.exits.leave`)."""
    leave(main(argv))
