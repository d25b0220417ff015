"""`--model s3://bucket/prefix`: a safetensors checkpoint in an S3-compatible object store
(S3, MinIO, Ceph, R2 through `AWS_ENDPOINT_URL`; ``gs://bucket/prefix`` for Cloud Storage
through its S3-compatible XML API with HMAC keys).

Rank 0 lists the prefix, reads ``config.json`` and the index whole (small), and each
shard's header by ranged GETs (no shard is downloaded); the plan records every shard's
ETag. Nothing is fetched per node: each rank's `S3Reader` fetches exactly its own byte
ranges, and the disk tier's weights are copied into the node's offload store.
"""

from __future__ import annotations

import json
import os
import tempfile

from ...checkpoint.index import MAX_JSON_BYTES, CheckpointIndex, index_from_headers, read_weight_map
from ...checkpoint.safetensors_header import header_length
from ...errors import CheckpointError
from ...log import logger
from ...io import Reader, ReadOptions
from ..base import Source, register_source
from ..pool import thread_map
from .client import SCHEMES, object_error, parse_url, s3_client
from .reader import S3Reader

__all__ = ["S3Source"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HEADER_FETCHERS = 8


@register_source
class S3Source(Source):
    """A checkpoint under ``s3://bucket/prefix`` (see the module doc)."""

    kind = "s3"

    def __init__(self, spec: str, **kw) -> None:
        super().__init__(spec, **kw)
        self.scheme, self.bucket, self.prefix = parse_url(spec)
        self.url = f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")
        self._etags: dict[str, str] | None = None

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.startswith(SCHEMES)

    def key(self, file: str) -> str:
        return f"{self.prefix}/{file}" if self.prefix else file

    def _get(self, file: str, *, start: int | None = None, end: int | None = None) -> bytes:
        url, kw = f"{self.url}/{file}", {}
        if start is not None:
            kw["Range"] = f"bytes={start}-{end - 1}"
        if self._etags and file in self._etags:
            kw["IfMatch"] = self._etags[file]
        try:
            return s3_client(self.scheme).get_object(Bucket=self.bucket, Key=self.key(file), **kw)["Body"].read()
        except Exception as e:  # noqa: BLE001 - network, auth, a missing object
            raise object_error(url, e, "reading it") from e

    def _list(self) -> dict[str, tuple[int, str]]:
        """file (directly under the prefix) -> (size, ETag)."""
        out, base = {}, self.key("")
        try:
            pages = s3_client(self.scheme).get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(base):]
                    if name and "/" not in name:
                        out[name] = (obj["Size"], obj["ETag"])
        except Exception as e:  # noqa: BLE001
            raise object_error(self.url + "/", e, "listing it") from e
        return out

    def _json(self, file: str, size: int) -> bytes:
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{self.url}/{file}: {size} bytes (limit {MAX_JSON_BYTES}); not a config or index")
        return self._get(file)

    def _header(self, file: str, size: int) -> tuple[bytes, int]:
        where = f"{self.url}/{file}"
        # two exact ranges (the length, then the header): no tensor byte is fetched here
        data = self._get(file, start=0, end=min(size, 8))
        n = header_length(data, size, file=where)
        data += self._get(file, start=8, end=8 + n)
        if len(data) < 8 + n:
            raise CheckpointError(f"{where}: the store sent {len(data)} bytes of its {8 + n}-byte header")
        return data[:8 + n], size

    def index(self) -> CheckpointIndex:
        files = self._list()
        if not files:
            raise CheckpointError(f"{self.url}/: no objects there (or the bucket does not exist)")
        self._etags = {f: etag for f, (_, etag) in files.items()}
        weight_map = None
        if INDEX in files:
            with tempfile.TemporaryDirectory(prefix="distload-s3-") as tmp:
                path = os.path.join(tmp, INDEX)
                with open(path, "wb") as f:
                    f.write(self._json(INDEX, files[INDEX][0]))
                weight_map = read_weight_map(path)
            shards = sorted(set(weight_map.values()))
        elif SINGLE in files:
            shards = [SINGLE]
        else:
            shards = sorted(f for f in files if f.endswith(".safetensors"))
        if not shards:
            raise CheckpointError(f"{self.url}/: no safetensors weights ({INDEX}, {SINGLE} or *.safetensors)")
        missing = [f for f in shards if f not in files]
        if missing:
            raise CheckpointError(f"{self.url}/{missing[0]}: no such object (a shard of its {INDEX})")
        config = None
        if "config.json" in files:
            try:
                config = json.loads(self._json("config.json", files["config.json"][0]))
            except ValueError as e:
                raise CheckpointError(f"{self.url}/config.json: cannot parse it: {e}") from None
        # raises the first failing shard's error; a signal leaves at once (`sources.pool`)
        headers = dict(zip(shards, thread_map(lambda f: self._header(f, files[f][0]), shards,
                                              workers=_HEADER_FETCHERS, name="distload-s3")))
        self._shards = shards
        return index_from_headers(self.url, headers, weight_map=weight_map, config=config)

    def identity(self) -> dict:
        ident = {"kind": self.kind, "label": self.url, "url": self.url}
        if self._etags is not None:   # rank 0, after `index`: the shards' versions every rank reads
            ident["etags"] = {f: self._etags[f] for f in getattr(self, "_shards", ())}
        return ident

    def check(self, identity: dict) -> None:
        """Every rank: the same URL as rank 0's; the shards' ETags are taken from the plan
        (every ranged GET asks for that version: a replaced object fails, named)."""
        if identity.get("kind") != self.kind or identity.get("url") != self.url:
            raise CheckpointError(f"this rank's --model {self.spec!r} is {self.url}, but rank 0 planned "
                                  f"{identity.get('label')}: every rank must be given the same checkpoint")
        self._etags = dict(identity.get("etags") or {})

    def root(self) -> str:
        return self.url

    def verify(self, files) -> int:
        """``--verify-checksums``: nothing is hashed here (that would download every shard
        on every node); each ranged GET is pinned to the ETag rank 0 planned (`If-Match`)
        and checked for its length, the store's own integrity covers the rest."""
        logger.warning("%s: --verify-checksums hashes no object in an object store (it would download "
                       "them); every read is pinned to the planned ETag instead", self.url)
        return 0

    def reader(self, options: ReadOptions | None = None) -> Reader:
        if self._etags is None:
            raise CheckpointError(f"{self.url}: a reader needs the plan's ETags (call check(plan.source) first)")
        return S3Reader(self.bucket, self.prefix, self._etags, options, scheme=self.scheme)
