"""distload: load models too big for one device across the ranks torchrun starts, each
rank reading only its own tensors, and run them as a pipeline.

Example::

    import distload
    pipe = distload.load("demo")            # under torchrun, or as one process
    logits = pipe.forward(input_ids)         # on rank 0; None on the other ranks
"""

from .api import load
from .errors import CheckpointError, DistloadError, LoadError, PlanError, RankError
from .meta import init_empty_weights, init_on_device
from .pipeline.pipe import Pipeline
from .plan.types import LoadPlan

__all__ = [
    "load", "Pipeline", "LoadPlan",
    "init_empty_weights", "init_on_device",
    "DistloadError", "CheckpointError", "PlanError", "LoadError", "RankError",
]
__version__ = "0.1.0"
