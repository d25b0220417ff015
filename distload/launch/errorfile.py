"""A rank's failure, told to the launcher that started it.

torchrun's agent gives each rank a file to describe its failure in (the environment
variable ``TORCHELASTIC_ERROR_FILE``); torch writes it only for an exception that leaves
a ``@record`` function. distload's CLI ends with its own one-line error instead, so it
writes that line here: ``torchrun``'s summary then shows it, and `distload.launch` names it.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["record_error", "ERROR_FILE_ENV"]

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


def record_error(message: str, *, relayed: bool = False) -> None:
    """Write `message` (this rank's one-line error) to the launcher's error file, if the
    launcher gave one. `relayed`: the error is another rank's, passed on (a `RankError`);
    the launcher then names the rank where it began. Never raises: the rank's own exit
    matters more than the note."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time())),
                                      "distload_relayed": relayed}}}
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)   # the agent reads it whole or not at all
    except OSError:
        pass
