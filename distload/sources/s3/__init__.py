"""Checkpoints in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...):
``--model s3://bucket/prefix``, each rank fetching only its own byte ranges with ranged
GETs (see `source` and `reader`). Needs the optional extra ``distload[s3]`` (boto3);
credentials, endpoint and region come from the standard AWS chain.

Files: `client` (URLs, the boto3 client and its retries, error lines), `source` (the
`Source`: listing, config, index and headers on rank 0), `reader` (the `Reader`: ranged
GETs into the destinations).
"""

from .reader import S3Reader, plan_requests
from .source import S3Source  # registers

__all__ = ["S3Source", "S3Reader", "plan_requests"]
