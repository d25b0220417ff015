"""Loading: `load()` inits the world, plans on rank 0 (`prepare.plan_load`), fetches each
node's files through the checkpoint's source, and `load_stage`s every rank's share —
allocate, map, read, exchange tied tensors, attach the cpu/disk tiers, report. The place
progress and trace hooks belong. Knows nothing of the CLI.

Example::

    pipe = load("./llama", dtype="bfloat16")      # every rank, under torchrun
    plan = plan_job("./llama")                      # the plan alone
"""

from .api import load, plan_job
from .fetch import fetch_node_files
from .prepare import PlanRequest, plan_load
from .stage import StageLoad, load_stage

__all__ = ["load", "plan_job", "fetch_node_files", "PlanRequest", "plan_load", "load_stage", "StageLoad"]
