"""distload: load models too big for one device across the ranks torchrun starts, each
rank reading only its own tensors, and run them as a pipeline.

Example::

    import distload
    pipe = distload.load("demo")            # under torchrun, or as one process
    logits = pipe.forward(input_ids)         # on rank 0; None on the other ranks
"""

import warnings

# torch warns at import when numpy is absent; distload never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from .compat.accelerate import (cpu_offload, disk_offload, dispatch_model, get_balanced_memory,  # noqa: E402
                                infer_auto_device_map, load_checkpoint_and_dispatch, load_checkpoint_in_model)
from .errors import CheckpointError, DistloadError, LoadError, PlanError, RankError
from .loader import load, plan_job
from .meta import init_empty_weights, init_on_device
from .pipeline import Pipeline
from .plan.types import LoadPlan

__all__ = [
    "load", "plan_job", "Pipeline", "LoadPlan",
    "infer_auto_device_map", "get_balanced_memory", "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model", "dispatch_model", "disk_offload", "cpu_offload", "init_empty_weights", "init_on_device",
    "DistloadError", "CheckpointError", "PlanError", "LoadError", "RankError",
]
__version__ = "0.1.0"
