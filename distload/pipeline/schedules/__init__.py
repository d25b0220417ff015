"""The pipeline's schedules, each a named unit the `Pipeline` selects (see `registry.py`):

* ``forward`` (`gpipe.py`) — GPipe's forward of one batch in micro-batches;
* ``forward_stream`` (`forward_stream.py`) — many batches, the pipeline kept full;
* ``generate`` (`ring_decode.py`) — KV-cache generation, sequence groups in a ring;
* ``continuous`` (`continuous.py`) — decoding whose sequences join and leave at every step
  (continuous batching, driven by `distload.serve`).

A new schedule is one new file plus one line here.
"""

from . import forward_stream, gpipe, ring_decode  # noqa: F401 - each registers itself
from . import continuous  # noqa: F401 - registers itself
from .registry import Schedule, get_schedule, register_schedule, schedule_names

__all__ = ["Schedule", "get_schedule", "register_schedule", "schedule_names"]
