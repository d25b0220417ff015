"""Measuring what memory this process has: its own device's free memory, the node's
available RAM, the offload directory's free space. The planner's budgets start here
(`distload.plan.budget.resolve_budgets` combines them with the user's `max_memory`).

Example::

    mine = measure_local(torch.device("cuda", local_rank), offload_dir="/scratch/off")
    default_limits()     # {0: free GPU 0 bytes - margin, ..., "cpu": 90% of free RAM}
"""

from __future__ import annotations

import os
import shutil

import psutil
import torch

from ..plan.budget import HOST_FRACTION, LocalMemory, device_margin

__all__ = ["measure_local", "default_limits"]


def measure_local(device, *, offload_dir: str | os.PathLike | None = None,
                  local_world_size: int | None = None) -> LocalMemory:
    """Measure this rank's memory. Every rank calls it for its own `device` (a CUDA device
    is queried with `torch.cuda.mem_get_info(device)`, so no context opens on another GPU).

    Example::

        mine = measure_local(torch.device("cuda", local_rank), offload_dir="/scratch/off")
    """
    device = torch.device(device)
    lws = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    free = None
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
    disk = None
    path = os.path.abspath(os.path.expanduser(os.fspath(offload_dir))) if offload_dir else None
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if path:
        disk = int(shutil.disk_usage(path).free)
    return LocalMemory(device.type, free, int(psutil.virtual_memory().available), disk, max(1, lws))


def default_limits() -> dict[int | str, int]:
    """One process's budgets when the user gives none (accelerate's `get_max_memory`):
    every visible GPU's free memory minus `device_margin`, and `HOST_FRACTION` of the
    available RAM as ``"cpu"``."""
    limits: dict[int | str, int] = {}
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        free = int(torch.cuda.mem_get_info(i)[0])
        limits[i] = free - device_margin(free)
    limits["cpu"] = int(psutil.virtual_memory().available * HOST_FRACTION)
    return limits
