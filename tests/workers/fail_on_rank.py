"""Under torchrun: rank FAIL_RANK hits a read error while the others read fine."""

import os
import sys

import distload
import distload.loader.stage
from distload.errors import CheckpointError

ckpt, fail_rank = sys.argv[1], int(sys.argv[2])
real_read_stage = distload.loader.stage.read_stage


def read_stage(reads, storage, **kw):
    if int(os.environ["RANK"]) == fail_rank:
        raise CheckpointError(f"injected read failure in {os.path.basename(reads[0].file)}")
    return real_read_stage(reads, storage, **kw)


distload.loader.stage.read_stage = read_stage
distload.load(ckpt, device="cpu")
