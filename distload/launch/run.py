"""The launcher's run: torchrun's parser and launch, then the exit code of the rank that
failed first (see `distload.launch`)."""

from __future__ import annotations

import signal
import sys

__all__ = ["main", "entry", "exit_code", "MEANINGS"]

# the CLI's documented codes (distload.cli.exits), for the launcher's line
MEANINGS = {1: "error", 2: "usage error", 128 + signal.SIGINT: "interrupted (SIGINT)",
            128 + signal.SIGTERM: "terminated (SIGTERM)"}


def _code(exitcode: int) -> int:
    """A process's status as a shell reports it: a signal N is 128+N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def exit_code(failures) -> tuple[int, int, object]:
    """`(rank, code, failure)` of the rank that speaks for a failed job, from
    ``ChildFailedError.failures`` (global rank -> `ProcessFailure`).

    The agent records first the ranks it found failed, in rank order, and only then those
    it stopped itself (with SIGTERM) because of them; of the former, a rank whose error is
    its own comes before one that passed on another rank's (`record_error`'s `relayed`)."""
    order = list(failures.items())

    def relayed(item) -> bool:
        data = item[1].error_file_data
        info = data.get("message", {}) if isinstance(data, dict) else {}
        return bool(isinstance(info, dict) and info.get("extraInfo", {}).get("distload_relayed"))

    first_poll = order[:1] + [item for item in order[1:] if not _stopped_by_agent(item[1])]
    rank, failure = min(first_poll, key=lambda item: (relayed(item), order.index(item)))
    return rank, _code(failure.exitcode), failure


def _stopped_by_agent(failure) -> bool:
    # the agent stops the others with SIGTERM: they die of it, or (the CLI) exit with 143
    return failure.exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGKILL)


def _describe(failure, code: int) -> str:
    message = getattr(failure, "message", "") or ""
    if isinstance(message, dict):   # an error file as torch writes it: {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    message = str(message).strip()
    if not message or message.startswith("To enable traceback"):
        if failure.exitcode < 0:
            message = f"killed by {failure.signal_name()}"
        else:
            message = f"exited with {code}" + (f" ({MEANINGS[code]})" if code in MEANINGS else "")
    return message.splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    """Launch as ``torchrun`` would with `argv` (default: the command line); return the exit
    code (0, the failed rank's code, or 128+N when stopped by signal N)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    parser.prog = "python -m distload.launch"
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    try:
        run(args)
    except ChildFailedError as exc:
        rank, code, failure = exit_code(exc.failures)
        print(f"distload.launch: rank {rank} (local rank {failure.local_rank}) failed, exit "
              f"code {code}: {_describe(failure, code)}", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:
        code = 128 + int(exc.sigval)
        print(f"distload.launch: stopped by {signal.Signals(exc.sigval).name}; the ranks were "
              f"told to stop (exit code {code})", file=sys.stderr, flush=True)
        return code
    return 0


def entry() -> None:
    """The ``distload-launch`` command: `main`, then exit with its code."""
    sys.exit(main())
