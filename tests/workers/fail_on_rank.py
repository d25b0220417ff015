"""Under torchrun: rank FAIL_RANK hits a read error while the others read fine."""

import os
import sys

import distload
import distload.api
from distload.errors import CheckpointError

ckpt, fail_rank = sys.argv[1], int(sys.argv[2])
real_read_stage = distload.api.read_stage


def read_stage(plan, rank, storage, **kw):
    if rank == fail_rank:
        file = plan.stage(rank).reads[0].file
        raise CheckpointError(f"injected read failure in {os.path.basename(file)}")
    return real_read_stage(plan, rank, storage, **kw)


distload.api.read_stage = read_stage
distload.load(ckpt, device="cpu")
