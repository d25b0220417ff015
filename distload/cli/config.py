"""The one configuration dataclass that drives the CLI (`python -m distload.load`).

Each field's metadata gives its flag help; `parse_args` builds argparse from the fields
and validates early, with messages that say what to do. The per-rank read options' flags
derive from their one declaration, `distload.io.ReadOptions` (`add_read_option_flags`):
a new read option is one line there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import MISSING, dataclass, field, fields, replace

import torch

from ..dist import DEFAULT_TIMEOUT_S
from ..io import ReadOptions
from ..launch.errorfile import record_error
from ..plan.budget import parse_max_memory_arg
from .exits import Interrupted
from .prompts import parse_ids

__all__ = ["RunConfig", "parse_args", "check_device", "flag_of", "add_read_option_flags", "read_options_from"]


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class RunConfig:
    model: str = _opt("demo", "local directory or .safetensors file, hub id ORG/NAME[@REV], or 'demo'")
    revision: str | None = _opt(None, "branch, tag or commit of a hub id --model (the same as ORG/NAME@REV); "
                                      "rank 0 resolves it to one commit for every node")
    dtype: str | None = _opt(None, "cast weights to this dtype (bfloat16, float16, float32); "
                                   "default: the checkpoint's own dtype")
    report: str | None = _opt(None, "write the job's load report as JSON to this path")
    strict: bool = _opt(True, "unexpected checkpoint keys are an error (--no-strict: a warning)",
                        negatable=True)
    cache_dir: str | None = _opt(None, "distload's own cache on each node: the demo checkpoint, hub headers, "
                                       "the default offload dir (default $DISTLOAD_CACHE or ~/.cache/distload); "
                                       "hub files stay in huggingface_hub's cache ($HF_HOME)")
    offload_dir: str | None = _opt(None, "shared directory for disk-tier weights (default "
                                         "<cache dir>/offload; see python -m distload.offload)")
    device: str | None = _opt(None, "'cpu' forces CPU ranks (gloo), 'cuda' GPU ranks (cuda:LOCAL_RANK); "
                                    "default cuda when CUDA is there")
    timeout_s: float | None = _opt(None, "seconds a rank waits on another before giving up (between calls, "
                                         "no limit); default: within the load as long as its bytes need "
                                         f"(at least {DEFAULT_TIMEOUT_S:g} s), within a call {DEFAULT_TIMEOUT_S:g} s",
                                   flag="timeout")
    verify_checksums: bool = _opt(False, "before any rank reads them, hash the files each node's ranks read: "
                                         "a hub id's against the hub's sha256, a local checkpoint's against "
                                         "a manifest in the cache dir written on the first such run",
                                  negatable=True)
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    input_ids: tuple[str, ...] = _opt((), "comma-separated token ids of one prompt; repeat for a batch",
                                      action="append")
    max_new_tokens: int = _opt(8, "tokens to generate per prompt (0: load and report only)")
    micro_batches: int | None = _opt(None, "micro-batches in flight (default: the world size)")
    max_memory: str | None = _opt(None, "memory budgets, e.g. '0=20GiB,1=20GiB,cpu=64GiB,disk=1TB' or "
                                        "JSON; cpu/disk are per node (GB = 10^9 bytes, GiB = 2^30)")
    max_batch_size: int | None = _opt(None, "largest batch to keep device room for, and the size of "
                                          "the batches prompts are generated in, like lengths together "
                                          "(default: room for 1, all prompts in one batch)")
    max_seq_len: int | None = _opt(None, "longest sequence (prompt + new tokens) to keep KV-cache room "
                                         "for (default min(2048, max_position_embeddings))")
    explain: bool = _opt(False, "print the plan (stages, tiers, reserves, why) and exit without loading",
                         negatable=True)
    prompt: tuple[str, ...] = _opt((), "prompt text (needs tokenizer.json in the model directory and "
                                       "the 'tokenizers' package); repeat for a batch", action="append")
    input_file: str | None = _opt(None, "JSON lines, one prompt per line: {\"input_ids\": [...]} or "
                                        "{\"prompt\": \"text\"}")
    output_file: str | None = _opt(None, "write one JSON line per prompt: its input object plus "
                                         "\"output_ids\" (and \"output_text\" with a tokenizer)")
    do_sample: bool = _opt(False, "sample the next token (default: greedy)", negatable=True)
    temperature: float | None = _opt(None, "sampling temperature (with --do-sample; default 1.0)")
    top_k: int | None = _opt(None, "sample among the k most likely tokens only (with --do-sample)")
    top_p: float | None = _opt(None, "sample from the smallest set of tokens whose probability "
                                     "reaches p (with --do-sample)")
    seed: int | None = _opt(None, "seed for sampling; equal seeds give equal tokens")
    eos_token_id: int | None = _opt(None, "a sequence stops at this token (default: the model "
                                          "config's eos_token_id)")
    trace: str | None = _opt(None, "write a timeline of the job (every rank's reads, waits, forwards, "
                                   "decode steps) to this path as Chrome/Perfetto trace JSON")

    # not a flag: `max_memory` parsed once, by `validate`
    memory_limits: dict | None = field(default=None, metadata={"flag": False})
    # the read options' own flags (`ReadOptions`, each field one; node-local: never compared
    # between ranks), parsed by `parse_args`
    read_options: ReadOptions = field(default_factory=ReadOptions, metadata={"flag": False})

    def validate(self) -> "RunConfig":
        """This config checked, with `memory_limits` parsed from `max_memory` (see
        `distload.plan.budget`); ValueError says what to write instead."""
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("--timeout must be positive")
        if self.max_new_tokens < 0:
            raise ValueError("--max-new-tokens must be 0 or more")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError("--micro-batches must be at least 1")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError("--max-batch-size must be at least 1")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError("--max-seq-len must be at least 1")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("--log-level must be DEBUG, INFO, WARNING or ERROR")
        for flag, path in (("--report", self.report), ("--output-file", self.output_file),
                           ("--trace", self.trace)):
            if path and path != "-" and os.path.isdir(path):
                raise ValueError(f"{flag} {path} is a directory; give a file path")
            if path and path != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise ValueError(f"{flag} {path}: its directory does not exist")
        check_device(self.device)
        self._validate_generation()
        return replace(self, model=self._model_at_revision(), memory_limits=parse_max_memory_arg(self.max_memory))

    def _model_at_revision(self) -> str:
        """`model` with `revision` folded in (``ORG/NAME@REV``), checked to be a hub id."""
        if self.revision is None:
            return self.model
        from ..sources import local_path, parse_hub_id

        hub = parse_hub_id(self.model)
        if hub is None or local_path(self.model) is not None:
            raise ValueError(f"--revision needs a hub id --model ORG/NAME, not {self.model!r}")
        repo, at = hub
        if at is not None and at != self.revision:
            raise ValueError(f"--model {self.model} names revision {at!r} but --revision says {self.revision!r}")
        return f"{repo}@{self.revision}"

    def _validate_generation(self) -> None:
        sources = [name for name, given in (("--input-ids", self.input_ids), ("--prompt", self.prompt),
                                             ("--input-file", self.input_file)) if given]
        if len(sources) > 1:
            raise ValueError(f"give prompts one way: {' and '.join(sources)} were both given")
        for text in self.input_ids:
            parse_ids(text)
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError("--temperature must be positive")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("--top-p must be in (0, 1]")

    def warnings(self) -> list[str]:
        """Flags that are valid but do nothing as given (rank 0 logs them)."""
        if self.do_sample:
            return []
        unused = [flag for flag, value in (("--temperature", self.temperature), ("--top-k", self.top_k),
                                            ("--top-p", self.top_p)) if value is not None]
        return [f"{', '.join(unused)} only apply with --do-sample; generating greedily"] if unused else []

    @property
    def sampling_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature


def check_device(device: str | None) -> None:
    """``--device``: ``cpu`` or ``cuda`` (each rank takes cuda:LOCAL_RANK), the latter only
    where this torch can reach a GPU. ValueError saying so otherwise."""
    if device is None or device == "cpu":
        return
    if device != "cuda":
        raise ValueError(f"--device {device}: give cpu or cuda (each rank then uses its own GPU, "
                         "cuda:LOCAL_RANK)")
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"--device cuda: {why}; use --device cpu")


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


USAGE_GRACE_SECONDS = 10.0


def _let_rank0_speak() -> None:
    """Another rank's wait before it exits on a bad flag: rank 0 parses the same argv and
    says what is wrong, but a rank that exited first could have torchrun stop rank 0
    before it did. Once rank 0 has left, torchrun stops this rank (a signal ends the wait);
    without torchrun (srun per rank) it exits after `USAGE_GRACE_SECONDS`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    try:
        time.sleep(USAGE_GRACE_SECONDS)
    except Interrupted:
        pass


class _Parser(argparse.ArgumentParser):
    """argparse, where rank 0 speaks for the job: a bad flag is one line on rank 0 (no
    usage text) and exit status 2 on every rank; ``--help`` prints on rank 0 only."""

    def error(self, message: str):
        record_error(f"{self.prog}: error: {message}")   # every rank: for the launcher's line
        if _rank0():
            sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
            sys.stderr.flush()
        else:
            _let_rank0_speak()
        self.exit(2)

    def print_help(self, file=None) -> None:
        if _rank0():
            super().print_help(file)


def flag_of(f) -> str:
    """The flag of a `RunConfig` field: ``--`` and its name (or its metadata's ``flag``),
    dashes for underscores."""
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def _parser(options: type[ReadOptions] = ReadOptions) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m distload.load",
        description="Load a model across the ranks torchrun started, each rank reading only its "
                    "own tensors, then run it as a pipeline.",
        epilog="example: torchrun --nproc_per_node=2 -m distload.load --model ./llama --dtype bfloat16")
    for f in fields(RunConfig):
        if f.metadata.get("flag") is False:
            continue
        flag = flag_of(f)
        meta = {k: v for k, v in f.metadata.items() if k != "flag"}
        help_text = meta.pop("help")
        default = f.default if f.default is not MISSING else None
        if meta.pop("negatable", False):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif meta.get("action") == "append":
            parser.add_argument(flag, dest=f.name, default=None, help=help_text, **meta)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text)
    add_read_option_flags(parser, options)
    return parser


def add_read_option_flags(parser: argparse.ArgumentParser, options: type[ReadOptions] = ReadOptions) -> None:
    """One flag per field of `options` (`ReadOptions` or a subclass: its `read_option`
    metadata), in a group of their own; each dest is the option's flag name, None where
    not given (the option's default then). `read_options_from` turns them into options."""
    group = parser.add_argument_group("per-rank read options (node-local: they may differ between ranks)")
    for f in fields(options):
        meta = f.metadata
        flag, dest = "--" + meta["flag"].replace("_", "-"), meta["flag"]
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        else:   # a custom parse runs in `read_options_from`, so that its error names the flag
            group.add_argument(flag, dest=dest, default=None, type=str if meta["parse"] else type(f.default),
                               metavar=meta["metavar"], help=meta["help"])


def read_options_from(values: dict, options: type[ReadOptions] = ReadOptions) -> ReadOptions:
    """The `options` the read-option flags in `values` (dest -> value, as parsed by
    `add_read_option_flags`) set; the others keep their defaults. Takes those entries out
    of `values`. ValueError names a bad flag."""
    given = {}
    for f in fields(options):
        flag = f.metadata["flag"]
        value = values.pop(flag, None)
        if value is None:
            continue
        if f.metadata["parse"] is not None:
            try:
                value = f.metadata["parse"](value)
            except ValueError as e:
                raise ValueError(f"--{flag.replace('_', '-')} {value}: {e}") from None
        given[f.name] = value
    return options(**given)


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse CLI arguments into a validated `RunConfig`. A bad flag or value: one line on
    rank 0 naming it, exit status 2 on every rank (each rank parses the same argv)."""
    parser = _parser()
    ns = vars(parser.parse_args(argv))
    ns = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ns.items()}
    ns["input_ids"] = ns["input_ids"] or ()
    ns["prompt"] = ns["prompt"] or ()
    try:
        read_options = read_options_from(ns)
        return RunConfig(**ns, read_options=read_options).validate()
    except ValueError as e:
        parser.error(str(e))
