"""``python -m distload.serve``: load as ``distload.load`` does, then rank 0 answers HTTP
while the other ranks follow its pipeline calls.

    torchrun --nproc_per_node=2 -m distload.serve --model PATH|ORG/NAME|demo --port 8000

The load flags are `distload.cli.config`'s (parsed by it); the server's own are below.
Rank 0 opens its port before anything else, so ``/health`` answers 503 while the ranks
meet and load, and 200 once serving; a port it cannot open stops every rank.

Ending: SIGTERM (or Ctrl-C) stops admission, lets in-flight and queued requests finish
within ``--shutdown-timeout`` seconds, aborts what is left, then every rank exits 143
(130) with one line. A rank that dies stops the server with a line naming it (exit 1):
no half-dead server that accepts requests and never answers. Exit codes as
`distload.cli.exits`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import traceback

from ..cli.config import parse_args
from ..cli.exits import ERROR, OK, USAGE, Interrupted, leave
from ..cli.main import _flags  # the load flags every rank must agree on, as distload.load checks them
from ..dist import DEFAULT_TIMEOUT_S, agree_on_arguments, init_world, run_on_rank0, shutdown
from ..errors import DistloadError, RankError, UsageError
from ..loader import load
from ..log import logger, setup_logging
from ..pipeline.inputs import resolve_eos

__all__ = ["main", "entry", "DEFAULT_SLOTS"]

DEFAULT_SLOTS = 16  # sequences the plan keeps KV-cache room for when --max-batch-size is not given
_GRACE_S = 30.0     # a follower's wait past the shutdown timeout for rank 0's word


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distload.serve", add_help=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (rank 0)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (rank 0)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: --model)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before new ones get 429")
    return p


def parse_serve_args(argv: list[str] | None):
    """(the server's flags, the load's `RunConfig`): the load flags go to
    `distload.cli.config.parse_args` (one line and exit 2 on a bad one)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        if os.environ.get("RANK", "0") == "0":
            _serve_parser().print_help()
            sys.stdout.write("\nand the load flags of python -m distload.load:\n\n")
        parse_args(["--help"])
    ns, rest = _serve_parser().parse_known_args(argv)
    if not 0 <= ns.port < 65536 or ns.shutdown_timeout < 0 or ns.max_queue < 1:
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write("python -m distload.serve: error: --port must be in [0, 65536), "
                             "--shutdown-timeout >= 0, --max-queue >= 1\n")
        raise SystemExit(USAGE)
    return ns, parse_args(rest)


# distload.load's flags about prompts, outputs and reports: a server has none of them
_UNUSED_FLAGS = ("input_ids", "prompt", "input_file", "output_file", "max_new_tokens", "report",
                 "trace", "explain", "do_sample", "temperature", "top_k", "top_p", "seed")


def _unused(cfg) -> list[str]:
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(cfg)}
    return ["--" + n.replace("_", "-") for n in _UNUSED_FLAGS if getattr(cfg, n) != defaults[n]]


class _Signals:
    """SIGTERM/SIGINT: while loading, stop at once (`Interrupted`); once serving, rank 0
    drains and the other ranks keep following until rank 0 closes the pipeline (a
    follower whose rank 0 never does leaves after the deadline)."""

    def __init__(self, shutdown_timeout_s: float) -> None:
        self.signum: int | None = None
        self.on_stop = None            # rank 0, once serving: start draining
        self.following = False         # other ranks, once serving
        self.timeout_s = shutdown_timeout_s
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if self.on_stop is not None:
            if first:
                self.on_stop()
            return
        if self.following:
            if first:
                threading.Timer(self.timeout_s + _GRACE_S, self._give_up).start()
            return
        raise Interrupted(signum)

    def _give_up(self) -> None:
        logger.error("stopped by %s: rank 0 did not close the pipeline in time",
                     signal.Signals(self.signum).name)
        leave(128 + self.signum)


def _bind(host: str, port: int):
    """Rank 0's listening socket, or the error to stop every rank with."""
    try:
        sock = socket.create_server((host, port), reuse_port=False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock, None
    except OSError as exc:
        return None, UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def _start_http(state, sock) -> threading.Thread:
    import uvicorn

    from .api import make_app

    config = uvicorn.Config(make_app(state), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="distload-http",
                              daemon=True)
    thread.start()
    return thread


def run(ns, cfg, signals: _Signals) -> int:
    rank0 = os.environ.get("RANK", "0") == "0"
    state = sock = bind_error = http = None
    if rank0:
        try:
            from .api import ServerState
        except ImportError as exc:
            raise UsageError(f"serving needs the [serve] extra: pip install 'distload[serve]' "
                             f"({exc})") from None
        state = ServerState(model_name=ns.served_model_name or cfg.model)
        sock, bind_error = _bind(ns.host, ns.port)
        if sock is not None:
            state.port = sock.getsockname()[1]  # --port 0: the one the system picked
            http = _start_http(state, sock)
    world = init_world(timeout_s=cfg.timeout_s or DEFAULT_TIMEOUT_S, device=cfg.device)
    served = {"--" + k.replace("_", "-"): v for k, v in vars(ns).items()}
    agree_on_arguments(world, {**_flags(cfg), **served})

    def check_port() -> None:
        if bind_error is not None:
            raise bind_error

    run_on_rank0(world, check_port, what="opening the server's port")
    if world.is_first and _unused(cfg):
        logger.warning("%s: not used by the server (each request brings its own prompt and sampling)", ", ".join(_unused(cfg)))
    pipe = load(cfg.model, dtype=cfg.dtype, strict=cfg.strict, cache_dir=cfg.cache_dir,
                offload_dir=cfg.offload_dir, device=cfg.device, timeout_s=cfg.timeout_s,
                read_options=cfg.read_options, micro_batches=cfg.micro_batches,
                max_memory=cfg.memory_limits, max_batch_size=cfg.max_batch_size or DEFAULT_SLOTS,
                max_seq_len=cfg.max_seq_len, world=world, workload="generate")
    if not world.is_first:
        signals.following = True
        pipe.serve()
        shutdown(world)
        if signals.signum is not None:
            logger.warning("stopped by %s: rank 0 closed the pipeline",
                           signal.Signals(signals.signum).name)
            return 128 + signals.signum
        return OK
    return _serve_rank0(pipe, ns, cfg, state, signals, world, http)


def _generation_config(root: str) -> dict:
    """The checkpoint's generation_config.json (its EOS ids, e.g. a chat model's end of
    turn, take precedence over config.json's, as in transformers' `generate`)."""
    path = os.path.join(root, "generation_config.json")
    try:
        with open(path) as f:
            found = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("%s: not read (%s)", path, exc)
        return {}
    return {k: found[k] for k in ("eos_token_id", "pad_token_id") if found.get(k) is not None}


def _serve_rank0(pipe, ns, cfg, state, signals: _Signals, world, http: threading.Thread) -> int:
    from .params import Limits
    from .scheduler import Scheduler, slots_for
    from .text import ModelText

    shape = pipe.plan.run_shape or {}
    slots = int(shape.get("max_batch_size") or cfg.max_batch_size or DEFAULT_SLOTS)
    # the parsed config's: GPT-2's n_positions is its max_position_embeddings
    context = int(shape.get("max_seq_len") or getattr(pipe.module.config, "max_position_embeddings", None)
                  or 2048)
    groups, group_size = slots_for(slots, cfg.micro_batches or world.world_size)
    scheduler = Scheduler(pipe, groups=groups, group_size=group_size, max_queue=ns.max_queue,
                          metrics=state.metrics,
                          watch=lambda: None if http.is_alive() else "the HTTP server stopped")
    eos, _ = resolve_eos(cfg.eos_token_id, None, {**pipe.plan.config, **_generation_config(pipe.root)})
    text = ModelText.open(pipe.root)

    def stop() -> None:
        state.stopping()
        scheduler.drain(ns.shutdown_timeout)

    signals.on_stop = stop  # before the first request: from now on a signal drains
    state.ready(scheduler, Limits(state.model_name, pipe.vocab_size, context), text, eos)
    if signals.signum is not None:  # a signal between the load and here
        stop()  # (again: ready() said "ready")
    logger.info("serving %s on http://%s:%d (%d groups of %d sequences, context %d%s)",
                state.model_name, ns.host, state.port or ns.port, groups, group_size, context,
                "" if text.has_tokenizer else "; no tokenizer.json: prompts as token ids")
    try:
        scheduler.run()
    finally:
        state.stopping()
    pipe.close()
    shutdown(world)
    name = signal.Signals(signals.signum).name
    logger.warning("stopped by %s: %d requests served", name, scheduler.served)
    return 128 + signals.signum


def main(argv: list[str] | None = None) -> int:
    """Serve; return the exit code. Every rank logs one line for a failure."""
    try:
        ns, cfg = parse_serve_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else USAGE
    setup_logging(cfg.log_level.upper())
    signals = _Signals(ns.shutdown_timeout)
    try:
        return run(ns, cfg, signals)
    except Interrupted as e:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        logger.warning("%s: stopping", e)
        code = e.exit_code
    except UsageError as e:
        code = USAGE
        logger.error("%s", e)
    except RankError as e:
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


def entry(argv: list[str] | None = None) -> None:
    leave(main(argv))


if __name__ == "__main__":
    entry()
