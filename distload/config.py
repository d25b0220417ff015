"""The one configuration dataclass that drives the CLI (`python -m distload.load`).

Each field's metadata gives its flag help; `parse_args` builds argparse from the fields
and validates early, with messages that say what to do.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields

__all__ = ["RunConfig", "parse_args"]


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class RunConfig:
    model: str = _opt("demo", "local directory or .safetensors file, hub id ORG/NAME, or 'demo'")
    dtype: str | None = _opt(None, "cast weights to this dtype (bfloat16, float16, float32); "
                                   "default: the checkpoint's own dtype")
    report: str | None = _opt(None, "write the job's load report as JSON to this path")
    strict: bool = _opt(True, "unexpected checkpoint keys are an error (--no-strict: a warning)",
                        negatable=True)
    cache_dir: str | None = _opt(None, "where the demo checkpoint is made (default $DISTLOAD_CACHE "
                                       "or ~/.cache/distload)")
    device: str | None = _opt(None, "'cpu' forces CPU ranks (gloo); default cuda:LOCAL_RANK when CUDA is there")
    timeout: float = _opt(600.0, "seconds a rank waits for the others before giving up")
    read_workers: int = _opt(2, "reader threads per rank")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    input_ids: tuple[str, ...] = _opt((), "comma-separated token ids of one prompt; repeat for a batch",
                                      action="append")
    max_new_tokens: int = _opt(8, "tokens to generate per prompt (0: load and report only)")
    micro_batches: int | None = _opt(None, "micro-batches in flight (default: the world size)")

    def validate(self) -> "RunConfig":
        if self.timeout <= 0:
            raise ValueError("--timeout must be positive")
        if self.read_workers < 1:
            raise ValueError("--read-workers must be at least 1")
        if self.max_new_tokens < 0:
            raise ValueError("--max-new-tokens must be 0 or more")
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError("--micro-batches must be at least 1")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("--log-level must be DEBUG, INFO, WARNING or ERROR")
        if self.report and not os.path.isdir(os.path.dirname(os.path.abspath(self.report))):
            raise ValueError(f"--report {self.report}: its directory does not exist")
        return self


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distload.load",
        description="Load a model across the ranks torchrun started, each rank reading only its "
                    "own tensors, then run it as a pipeline.",
        epilog="example: torchrun --nproc_per_node=2 -m distload.load --model ./llama --dtype bfloat16")
    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        default = f.default if f.default is not MISSING else None
        if meta.pop("negatable", False):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif meta.get("action") == "append":
            parser.add_argument(flag, dest=f.name, default=None, help=help_text, **meta)
        else:
            kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse CLI arguments into a validated `RunConfig`; bad values exit with usage."""
    parser = _parser()
    ns = vars(parser.parse_args(argv))
    ns = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ns.items()}
    ns["input_ids"] = ns["input_ids"] or ()
    try:
        return RunConfig(**ns).validate()
    except ValueError as e:
        parser.error(str(e))
