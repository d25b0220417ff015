"""One rank of `_bench_s3.py`'s systems (see there). Writes OUT/rank{R}.json: seconds from
the moment every rank is ready to its load's end, and bytes written to disk.

    torchrun --nproc_per_node=N _bench_s3_worker.py SYSTEM s3://BUCKET/PREFIX OUT
"""

import json
import os
import sys
import time

import boto3
import torch.distributed as dist
from botocore.config import Config

import distload
from distload.dist import init_world

system, url, out = sys.argv[1], sys.argv[2], sys.argv[3]
world = init_world(device="cpu")
rank = world.rank
bucket, _, prefix = url[len("s3://"):].partition("/")


def download(directory: str) -> int:
    """boto3's managed download of every object under the prefix; returns bytes written."""
    client = boto3.client("s3", config=Config(user_agent_extra=f"distload-rank/{rank}"))
    os.makedirs(directory, exist_ok=True)
    written = 0
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]:
        path = os.path.join(directory, obj["Key"].rsplit("/", 1)[1])
        client.download_file(bucket, obj["Key"], path)
        written += os.path.getsize(path)
    return written


dist.barrier()
start, written = time.perf_counter(), 0
if system == "distload-s3":
    pipe = distload.load(url, device="cpu", world=world)
elif system == "download-all":
    # each rank its own copy, named alike ("ckpt" under the rank's own working directory):
    # the ranks' --model must agree
    os.makedirs(os.path.join(out, f"rank{rank}"))
    os.chdir(os.path.join(out, f"rank{rank}"))
    written = download("ckpt")
    pipe = distload.load("ckpt", device="cpu", world=world)
    os.chdir(out)
else:  # node-download: the node's first rank downloads, every rank loads that copy
    node = os.path.join(out, "node")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        written = download(node)
    dist.barrier()
    pipe = distload.load(node, device="cpu", world=world)
seconds = time.perf_counter() - start
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:  # noqa: PTH123
    json.dump({"rank": rank, "seconds": seconds, "written": written, "bytes_read": pipe.report["bytes_read"],
               "tensor_bytes": pipe.report["tensor_bytes"]}, f)
pipe.close()
dist.barrier()
distload.dist.shutdown(world)
