"""The object-store reader: a rank's read items as ranged GETs, `workers` in flight, each
body streamed straight into its destinations (a CPU tensor of the stored dtype: its own
bytes; otherwise through a buffer of at most `staging_bytes` per worker, copied and cast
on the destination's device: the extra memory stays ``workers * staging_bytes``).
Adjacent tensors of a file share a request, long ones are cut into requests of at most
`staging_bytes`; no byte outside the rank's tensors is asked for, and nothing is written
to disk.

Every GET names the shard's ETag from the plan (``If-Match``): an object replaced since
rank 0 planned fails, named; so does a response shorter than its range. botocore retries
5xx, throttling and dropped connections (`client`); a body cut off mid-stream is asked
for again, up to the same number of attempts.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ... import trace
from ...checkpoint.files import byte_view
from ...checkpoint.types import TensorMeta
from ...errors import CheckpointError
from ...io import Reader, ReadOptions, ReadProgress, ReadStats
from ..pool import thread_map
from .client import DEFAULT_MAX_ATTEMPTS, object_error, s3_client

__all__ = ["S3Reader"]

_BODY_CHUNK = 1 << 20        # bytes taken from a response body per read
_ALIGN = 4096                # requests cut at multiples of this: whole elements of any dtype


@dataclass(frozen=True)
class _Part:
    meta: TensorMeta
    start: int       # byte offset inside the tensor
    nbytes: int


@dataclass(frozen=True)
class _Request:
    file: str
    offset: int      # absolute, in the object
    parts: tuple[_Part, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def plan_requests(reads: Sequence[TensorMeta], chunk: int) -> list[_Request]:
    """Ranged GETs for `reads`: neighbours (no gap) coalesced up to `chunk` bytes, a longer
    tensor cut into pieces of `chunk` (a multiple of every dtype's size). Pure."""
    out: list[_Request] = []
    by_file: dict[str, list[TensorMeta]] = defaultdict(list)
    for m in reads:
        if m.length:
            by_file[m.file].append(m)
    for file in sorted(by_file):
        parts: list[_Part] = []
        offset = end = -1
        for m in sorted(by_file[file], key=lambda m: m.offset):
            for start in range(0, m.length, chunk):
                n = min(chunk, m.length - start)
                here = m.offset + start
                if parts and here == end and end - offset + n <= chunk:
                    parts.append(_Part(m, start, n))
                else:
                    if parts:
                        out.append(_Request(file, offset, tuple(parts)))
                    parts, offset = [_Part(m, start, n)], here
                end = here + n
        if parts:
            out.append(_Request(file, offset, tuple(parts)))
    return out


class S3Reader(Reader):
    """Reads objects ``<scheme>://bucket/prefix/<file>`` at the versions `etags` names."""

    def __init__(self, bucket: str, prefix: str, etags: Mapping[str, str],
                 options: ReadOptions | None = None, *, scheme: str = "s3") -> None:
        super().__init__(options)
        self.bucket, self.prefix, self.etags, self.scheme = bucket, prefix, dict(etags), scheme
        self.root = f"{scheme}://{bucket}/{prefix}".rstrip("/") + "/"

    def describe(self, file: str) -> str:
        return self.root + file

    def _key(self, file: str) -> str:
        return f"{self.prefix}/{file}" if self.prefix else file

    def check(self, files: Sequence[str], sizes: Mapping[str, int]) -> None:
        client = s3_client(self.scheme)
        for file in files:
            try:
                head = client.head_object(Bucket=self.bucket, Key=self._key(file))
            except Exception as e:  # noqa: BLE001
                raise object_error(self.describe(file), e, "checking it") from e
            want, etag = sizes.get(file), self.etags.get(file)
            if want is not None and head["ContentLength"] != want:
                raise CheckpointError(f"{self.describe(file)} is {head['ContentLength']} bytes but was {want} "
                                      "when rank 0 planned the load: the object changed")
            if etag is not None and head["ETag"] != etag:
                raise CheckpointError(f"{self.describe(file)} changed since rank 0 planned the load (ETag "
                                      f"{head['ETag']}, planned {etag}): every rank must read the same checkpoint")

    def entry_source(self, file: str) -> tuple[str, int, int]:
        # the ETag in the identity: a replaced object gets other offload entries
        return f"{self.describe(file)}#{self.etags.get(file, '').strip(chr(34))}", 0, 0

    def read(self, reads: Sequence[TensorMeta], dests: Mapping[str, torch.Tensor], *,
             progress: ReadProgress | None = None, workers: int | None = None) -> ReadStats:
        begin = time.perf_counter()
        for m in reads:
            if m.offset < 0:
                raise CheckpointError(f"{self.describe(m.file)}: an object store holds safetensors only")
            if tuple(dests[m.name].shape) != tuple(m.shape):
                raise ValueError(f"destination of {m.name} has shape {tuple(dests[m.name].shape)}, "
                                 f"the checkpoint's is {tuple(m.shape)}")
        # A destination not contiguous is read into a stand-in, copied after (rare)
        targets = {m.name: dests[m.name] for m in reads}
        standins = {m.name: torch.empty(m.shape, dtype=dests[m.name].dtype, device=dests[m.name].device)
                    for m in reads if not dests[m.name].is_contiguous()}
        targets.update(standins)
        chunk = max(_ALIGN, self.options.staging_bytes // _ALIGN * _ALIGN)
        requests = plan_requests(reads, chunk)
        threads = max(1, min(workers or self.options.workers, len(requests)))
        stats = ReadStats(threads=threads)
        staged = [0]
        # the first failing request's error, once all ended; a signal leaves at once (`sources.pool`)
        for got, buffered in thread_map(lambda r: self._fetch(r, targets, progress), requests,
                                        workers=threads, name="distload-s3"):
            stats.bytes_read += got
            stats.io_bytes += got
            stats.syscalls += 1
            staged[0] = max(staged[0], buffered)
        for name, standin in standins.items():
            dests[name].copy_(standin)
        stats.staging_bytes = staged[0] * threads   # at most one buffer per worker at once
        stats.seconds = time.perf_counter() - begin
        return stats

    def _fetch(self, req: _Request, targets, progress: ReadProgress | None) -> tuple[int, int]:
        """One ranged GET into its parts' tensors; returns (bytes received, staging bytes
        it used). Parts whose destination holds the stored bytes (a CPU tensor of the
        same dtype) are filled straight from the body; the others (a cast, a GPU) come
        through one buffer of the request's size, copied (and cast) after."""
        url, n = self.describe(req.file), req.nbytes
        direct = all(_direct(p.meta, targets[p.meta.name]) for p in req.parts)
        buffer = None if direct else torch.empty(n, dtype=torch.uint8)
        if direct:
            views = [byte_view(targets[p.meta.name])[p.start:p.start + p.nbytes] for p in req.parts]
        else:
            views = [byte_view(buffer)]
        kw = {"Range": f"bytes={req.offset}-{req.offset + n - 1}"}
        if req.file in self.etags:
            kw["IfMatch"] = self.etags[req.file]
        client = s3_client(self.scheme)
        for attempt in range(1, DEFAULT_MAX_ATTEMPTS + 1):
            with trace.span("read", "io", file=url, offset=req.offset, bytes=n):
                try:
                    body = client.get_object(Bucket=self.bucket, Key=self._key(req.file), **kw)["Body"]
                except Exception as e:  # noqa: BLE001 - after botocore's retries
                    raise object_error(url, e, f"a ranged GET of bytes {req.offset}-{req.offset + n - 1}") from e
                try:
                    got = _stream(body, views)
                except Exception as e:  # noqa: BLE001 - the connection dropped mid-body: ask again
                    if attempt == DEFAULT_MAX_ATTEMPTS:
                        raise object_error(url, e, f"reading bytes {req.offset}-{req.offset + n - 1}") from e
                    time.sleep(min(2.0 ** attempt / 10, 2.0))
                    continue
                finally:
                    body.close()
            if got != n:
                raise CheckpointError(f"{url}: the store sent {got} of the {n} bytes from byte {req.offset} "
                                      "(a short object, or a truncated response)")
            if buffer is not None:
                _scatter(buffer, req.parts, targets)
            if progress is not None:
                progress(url, n)
            return n, 0 if buffer is None else n
        raise AssertionError("unreachable")


def _scatter(buffer: torch.Tensor, parts: Sequence[_Part], targets: Mapping[str, torch.Tensor]) -> None:
    """Copy each part's bytes from `buffer` into its tensor's elements (cast to the
    destination's dtype, on its device)."""
    pos = 0
    for p in parts:
        size = p.meta.torch_dtype.itemsize
        raw = buffer[pos:pos + p.nbytes]
        src = (raw if pos % size == 0 else raw.clone()).view(p.meta.torch_dtype)   # aligned for the view
        targets[p.meta.name].view(-1)[p.start // size:(p.start + p.nbytes) // size].copy_(src)
        pos += p.nbytes


def _direct(meta: TensorMeta, dest: torch.Tensor) -> bool:
    return dest.device.type == "cpu" and dest.dtype == meta.torch_dtype and dest.is_contiguous()


def _stream(body, views: list[memoryview]) -> int:
    """Fill `views` in order from the response `body`; returns the bytes it held (less
    than asked where it ended early; more is an error of the store)."""
    got = 0
    for view in views:
        pos = 0
        while pos < len(view):
            data = body.read(min(_BODY_CHUNK, len(view) - pos))
            if not data:
                return got
            view[pos:pos + len(data)] = data
            pos += len(data)
            got += len(data)
    if body.read(1):
        raise CheckpointError("the store sent more bytes than the range asked for")
    return got
