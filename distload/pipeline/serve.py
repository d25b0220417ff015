"""`serve`: the ranks other than 0 follow whatever calls rank 0 makes, for as long as it
makes them — the loop a pipeline-parallel inference launcher runs beside rank 0's
request handling.

Rank 0 announces each call's kind (`calls.CallChannel`); a serving rank waits for the
announcement without a time limit, takes part in the call, and goes back to waiting,
until rank 0 calls `Pipeline.close()` (or its interpreter exits). A call that rank 0 ended
on a bad input (`CallAborted`) raised there, for its caller; the serving ranks log it and
go on, since the pipeline is still usable. Any other error ends `serve` with it.

Example (under ``torchrun --nproc_per_node=2``)::

    pipe = distload.load("demo")
    if pipe.rank == 0:
        for request in requests():                 # as long as it likes, idle or not
            reply(pipe.generate(request.ids, max_new_tokens=32))
        pipe.close()
    else:
        pipe.serve()                               # returns once rank 0 closes
"""

from __future__ import annotations

from ..errors import CallAborted
from ..log import logger
from .calls import CLOSE
from .figures import share_figures
from .schedules import get_schedule

__all__ = ["serve"]


def serve(pipe) -> int:
    """Ranks other than 0: take part in each call rank 0 makes until it closes the
    pipeline; return how many calls were served."""
    if pipe.world.is_first:
        raise RuntimeError("serve() is for the ranks other than 0, which follow rank 0's calls; "
                           "rank 0 makes the calls (forward, forward_stream, generate), then "
                           "close()")
    served = 0
    while (kind := pipe.calls.next_call()) != CLOSE:
        try:
            get_schedule(kind).follow(pipe)
        except CallAborted as exc:  # raised on rank 0 too, for its caller
            logger.debug("rank 0 ended a %s call: %s", kind, exc)
        else:
            share_figures(pipe)
        served += 1
    logger.debug("served %d calls; rank 0 closed the pipeline", served)
    return served
