"""Running a loaded model as a pipeline across the ranks: the `Pipeline` each rank gets
from `distload.load`, call announcements (`calls`), point-to-point transport (`comm`),
the headers that announce each batch and step (`messages`), micro-batch arithmetic
(`microbatch`), rank 0's input checks (`inputs`), sampling, `serve` for launchers, and the
named schedules (`schedules/`). Knows nothing of file formats or Hugging Face weight
names: it runs stages through the model contract (`distload.models.contract`).
"""

from .calls import CallChannel
from .pipe import Pipeline

__all__ = ["Pipeline", "CallChannel"]
