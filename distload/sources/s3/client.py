"""The boto3 side of the object-store source: parsing ``s3://bucket/prefix`` (or
``gs://bucket/prefix``: Cloud Storage through its S3-compatible XML API), one client
per process from the standard AWS chain (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`,
`AWS_ENDPOINT_URL`, `AWS_REGION`, ...), botocore's own retries (standard mode: backoff on
5xx, throttling and dropped connections; `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` override),
and one error line naming the object for every failure.

boto3 is the optional extra ``distload[s3]``; nothing here imports it before a client is
asked for.
"""

from __future__ import annotations

import os
import threading

from ...errors import CheckpointError

__all__ = ["parse_url", "s3_client", "object_error", "DEFAULT_MAX_ATTEMPTS", "SCHEMES"]

SCHEMES = ("s3://", "gs://")
# gs:// is Cloud Storage's S3-compatible XML API: HMAC keys in AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY, ranged GETs and If-Match as on S3. DISTLOAD_GCS_ENDPOINT points it
# elsewhere (a private endpoint, a test server); AWS_ENDPOINT_URL stays the s3:// one.
GCS_ENDPOINT = "https://storage.googleapis.com"
GCS_ENDPOINT_ENV = "DISTLOAD_GCS_ENDPOINT"
DEFAULT_MAX_ATTEMPTS = 5          # botocore standard mode's attempts (first try included)
_POOL_CONNECTIONS = 32            # >= the requests a rank keeps in flight (read workers)
_lock = threading.Lock()
_clients: dict[tuple, object] = {}


def parse_url(spec: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix without slashes at its ends) of ``s3://bucket/prefix`` or
    ``gs://bucket/prefix``."""
    if not spec.startswith(SCHEMES):
        raise CheckpointError(f"{spec}: not an s3:// or gs:// URL")
    scheme, _, rest = spec.partition("://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise CheckpointError(f"{spec}: no bucket (give {scheme}://bucket/prefix)")
    return scheme, bucket, prefix.strip("/")


def s3_client(scheme: str = "s3"):
    """This process's client for `scheme`'s store (thread-safe; made once per credentials
    environment)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise CheckpointError("an s3:// checkpoint needs boto3: pip install 'distload[s3]'") from None
    endpoint, region = None, None   # None: botocore's own chain (AWS_ENDPOINT_URL, AWS_REGION, ...)
    if scheme == "gs":
        endpoint = os.environ.get(GCS_ENDPOINT_ENV) or GCS_ENDPOINT
        region = os.environ.get("AWS_REGION") or "auto"   # SigV4 needs one; Cloud Storage takes "auto"
    key = (scheme, endpoint, region) + tuple(os.environ.get(k) for k in (
        "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE"))
    with _lock:
        client = _clients.get(key)
        if client is None:
            config = Config(retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                                     "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS",
                                                                              DEFAULT_MAX_ATTEMPTS))},
                            max_pool_connections=_POOL_CONNECTIONS,
                            user_agent_extra=f"distload-rank/{os.environ.get('RANK', '0')}")
            client = _clients[key] = boto3.session.Session().client(
                "s3", config=config, endpoint_url=endpoint, region_name=region)
        return client


def object_error(url: str, exc: BaseException, what: str) -> CheckpointError:
    """One line naming the object for a failed request (after botocore's retries)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return CheckpointError(f"{url}: {what} failed: no AWS credentials (set AWS_ACCESS_KEY_ID/"
                               "AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if str(code) in ("NoSuchKey", "404"):
            return CheckpointError(f"{url}: no such object ({what})")
        if str(code) in ("PreconditionFailed", "412"):
            return CheckpointError(f"{url} changed since rank 0 planned the load (its ETag differs): "
                                   "every rank must read the same checkpoint")
        if str(code) in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return CheckpointError(f"{url}: {what} was refused ({code}): check the AWS credentials "
                                   "(AWS_ACCESS_KEY_ID, AWS_PROFILE) and their rights")
        msg = err.get("Message") or ""
        return CheckpointError(f"{url}: {what} failed: {code} {msg}".rstrip())
    return CheckpointError(f"{url}: {what} failed: {type(exc).__name__}: {exc}")
