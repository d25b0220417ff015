"""Rank 0's index of a hub checkpoint, from its shards' headers alone: no shard is
downloaded to plan.

For ``org/name[@rev]``: the revision is resolved to a commit sha once, by downloading
``config.json`` at that revision with huggingface_hub (which records the branch or tag in
its cache, so that ``HF_HUB_OFFLINE=1`` resolves it again later); the repo's file list at
that commit and each shard's safetensors header (the first 8 + n bytes, fetched with
``Range`` requests through huggingface_hub's own session, as its
``get_safetensors_metadata`` does) are kept in distload's cache, keyed by commit and file::

    <cache_root>/hub/models--org--name/<sha>/files.json           {path: size}
    <cache_root>/hub/models--org--name/<sha>/headers/<shard>      its first 8 + n bytes

so a rerun plans without a request, also offline, also for shards that its own node never
downloaded. A commit's files never change, so nothing here expires. A shard that
huggingface_hub's cache already holds has its header read from the local file instead.

Rank 0 only. Example::

    remote = remote_index("acme/llama", "main")
    remote.sha, remote.index.tensors, remote.support     # support: config, tokenizer files
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_root
from ..checkpoint.index import CheckpointIndex, index_from_headers, read_weight_map
from ..checkpoint.safetensors_header import header_length, parse_safetensors_header, read_header_bytes
from ..errors import CheckpointError
from ..log import logger
from .pool import thread_map

__all__ = ["RemoteCheckpoint", "remote_index", "resolve_commit", "snapshot_dir", "offline", "download", "reason",
           "SUPPORT_PATTERNS", "HEADER_PROBE"]

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# What every node takes beside the shards its ranks read: config, tokenizer, generation
# settings, the index. Top-level files only (a repo's subfolders hold other formats).
SUPPORT_PATTERNS = ("*.json", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt")
# The first range asked of each shard: as huggingface_hub's parse_safetensors_file_metadata,
# enough for the whole header of nearly every checkpoint (a second range fetches the rest).
HEADER_PROBE = 100_000
_MAX_FETCHERS = 8
# A header request is retried only on what is transient, a few times (1 + 2 + 4 s at most):
# an HTTP 500 is the server failing on this request, and retrying it only delays the line.
_RETRY_STATUS = (429, 502, 503, 504)
_MAX_RETRIES = 3
_SHA = re.compile(r"[0-9a-f]{40}")
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A hub checkpoint at one commit: `index` (its `root` is where the snapshot lies, or
    would, in this node's huggingface_hub cache), the commit `sha`, and the `support`
    files (config, tokenizer) each node takes beside the shards."""

    index: CheckpointIndex
    sha: str
    support: tuple[str, ...]


def offline() -> bool:
    """``HF_HUB_OFFLINE``, read now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def reason(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` of a client's exception on one line (huggingface_hub's span
    several: status, URL, the server's message), at most `limit` characters. Where the
    client wrapped a server's answer ("check your connection"), the answer is named: the
    status and the request that got it."""
    cause = exc
    while cause is not None and getattr(cause, "response", None) is None:
        cause = cause.__cause__
    response = getattr(cause, "response", None)
    if cause is not exc and response is not None and getattr(response, "status_code", None):
        request = getattr(response, "request", None)
        what = f" to {request.method} {request.url}" if request is not None else ""
        text = (f"the server answered HTTP {response.status_code} {getattr(response, 'reason_phrase', '')}"
                f"{what}").rstrip()
    else:
        text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def snapshot_dir(repo: str, sha: str) -> str:
    """Where huggingface_hub's cache on this node keeps commit `sha` of `repo`
    (``$HF_HUB_CACHE/models--org--name/snapshots/<sha>``), whether or not it exists."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo, repo_type="model"),
                        "snapshots", sha)


def download(repo: str, file: str, revision: str) -> str:
    """`file` of `repo` at `revision` in this node's huggingface_hub cache (downloaded if
    missing, never when offline): its local path. Errors name the file."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, file, revision=revision, local_files_only=offline())
    except Exception as e:  # network, auth, a missing file: every cause ends the same way
        where = f"{repo}@{revision}: {file}"
        if offline():
            raise CheckpointError(f"{where} is not in this node's hub cache and HF_HUB_OFFLINE=1 "
                                  f"forbids downloading it ({reason(e)})") from e
        raise CheckpointError(f"{where}: download failed: {reason(e)}") from e


def resolve_commit(repo: str, revision: str | None) -> tuple[str, str]:
    """(commit sha, local path of its ``config.json``, in the commit's snapshot directory
    of this node's hub cache) for `revision` (a branch, tag or
    sha; default ``main``): one HEAD request when online (none for a sha whose config is
    cached); offline, huggingface_hub's cache maps a branch or tag to its last commit."""
    path = download(repo, CONFIG, revision or "main")
    sha = Path(path).parent.name  # hf_hub_download returns .../snapshots/<sha>/config.json
    if not _SHA.fullmatch(sha):
        raise CheckpointError(f"{repo}@{revision}: cannot tell the commit of {path}")
    return sha, path


class _CommitCache:
    """distload's cache of one commit's file list and shard headers (see the module doc).
    Writes are atomic (temporary file, then rename): a reader never sees half a header,
    and two jobs writing the same entry write the same bytes."""

    def __init__(self, repo: str, sha: str, cache_dir) -> None:
        from huggingface_hub.file_download import repo_folder_name

        self.dir = cache_root(cache_dir) / "hub" / repo_folder_name(repo_id=repo, repo_type="model") / sha

    def files(self) -> dict[str, int] | None:
        try:
            return json.loads((self.dir / "files.json").read_text())
        except (OSError, ValueError):
            return None

    def header_path(self, file: str) -> Path:
        return self.dir / "headers" / file

    def header(self, file: str) -> bytes | None:
        try:
            return self.header_path(file).read_bytes()
        except OSError:
            return None

    def drop_header(self, file: str) -> None:
        try:
            self.header_path(file).unlink()
        except OSError as e:   # a read-only cache: the next run drops it again
            logger.warning("cannot remove %s: %s", self.header_path(file), e)

    def put_files(self, files: dict[str, int]) -> None:
        self._write(self.dir / "files.json", json.dumps(files, sort_keys=True).encode())

    def put_header(self, file: str, data: bytes) -> None:
        self._write(self.dir / "headers" / file, data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:  # a read-only cache costs requests next time, nothing else
            logger.warning("cannot keep %s in distload's cache: %s", path, e)


def _list_files(repo: str, sha: str, cache: _CommitCache) -> tuple[dict[str, int], bool]:
    """({path: size} of the commit's files, whether that is all of them): from distload's
    cache, else one listing request (kept), else (offline) what this node's snapshot
    holds, which may be part of the commit only."""
    files = cache.files()
    if files is not None:
        return files, True
    if offline():
        snap = Path(snapshot_dir(repo, sha))
        if not snap.is_dir():
            raise CheckpointError(f"{repo}@{sha}: not in distload's cache nor in this node's hub cache, "
                                  "and HF_HUB_OFFLINE=1 forbids listing it")
        return {p.relative_to(snap).as_posix(): p.stat().st_size for p in snap.rglob("*") if p.is_file()}, False
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        files = {e.path: e.size for e in HfApi().list_repo_tree(repo, revision=sha, recursive=True)
                 if isinstance(e, RepoFile)}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{repo}@{sha}: listing its files failed: {reason(e)}") from e
    cache.put_files(files)
    return files, True


def _fetch_header(repo: str, sha: str, file: str, size: int, cancel: threading.Event | None = None) -> bytes:
    """The first 8 + n bytes of `file` by range requests (huggingface_hub's session:
    HF_ENDPOINT, HF_TOKEN and redirects as it handles them). Retries only what is
    transient (429, 502-504, a dropped connection), a few times; an HTTP 500 fails at
    once. A server that ignores `Range` (200, the whole file) is read only as far as the
    header reaches, then the connection is closed. `cancel` set: no further try (the
    process is stopping)."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo, file, revision=sha)
    headers = build_hf_headers()

    busy: list[int] = []   # transient statuses seen

    def once(start: int, end: int) -> bytes | None:
        """The bytes [start, end), or None for a transient status worth another try."""
        with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end - 1}"},
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, follow_redirects=True) as response:
            if response.status_code in _RETRY_STATUS:
                busy.append(response.status_code)
                return None
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            whole = response.status_code != 206   # the server sent the file from byte 0
            want = end if whole else end - start
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) >= want:
                    break                          # closing the stream drops the rest
        if whole:
            _warn_no_range(url, response.status_code)
            return bytes(data[start:end])
        return bytes(data[:want])

    def get(start: int, end: int) -> bytes:
        for attempt in range(_MAX_RETRIES + 1):
            last = attempt == _MAX_RETRIES or (cancel is not None and cancel.is_set())
            try:
                data = once(start, end)
            except HfHubHTTPError:
                raise
            except Exception as e:  # noqa: BLE001 - a dropped connection, a timeout
                if last:
                    raise
                logger.warning("%s: %s; trying again in %d s", url, reason(e), 1 << attempt)
            else:
                if data is not None:
                    return data
                if last:
                    raise CheckpointError(f"{url}: the server answered HTTP {busy[-1]} "
                                          f"{len(busy)} times")
                logger.warning("%s: the server answered HTTP %d; trying again in %d s", url, busy[-1],
                               1 << attempt)
            if cancel is not None and cancel.wait(1 << attempt):
                raise CheckpointError(f"{url}: stopped")
            if cancel is None:
                time.sleep(1 << attempt)
        raise AssertionError("unreachable")

    where = f"{repo}@{sha}: {file}"
    try:
        data = get(0, min(size, HEADER_PROBE))
        n = header_length(data, size, file=f"{where} (as the server sent it)")
        if len(data) < 8 + n:
            data += get(len(data), 8 + n)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - network, auth, a missing file
        raise CheckpointError(f"{where}: reading its safetensors header failed: {reason(e)}") from e
    if len(data) < 8 + n:
        raise CheckpointError(f"{where}: the server sent {len(data)} bytes of its {8 + n}-byte header")
    return data[:8 + n]


_warned_no_range: set[str] = set()


def _warn_no_range(url: str, status: int) -> None:
    host = url.split("/")[2] if "//" in url else url
    if host not in _warned_no_range:
        _warned_no_range.add(host)
        logger.warning("%s answered a range request with HTTP %d (the whole file): reading only "
                       "the header's bytes of each answer and closing it", host, status)


def _valid(data: bytes, size: int, file: str) -> bytes:
    """`data` if it parses as a safetensors header of a `size`-byte file (as a local
    file's is checked), else raise `CheckpointError` naming `file`."""
    parse_safetensors_header(data, size, file=file)
    return data


def _header(repo: str, sha: str, file: str, size: int, cache: _CommitCache,
            cancel: threading.Event | None = None) -> tuple[bytes, int]:
    """`file`'s header bytes and size: distload's cache, this node's hub cache, or the hub.
    Every header is validated before it is kept; a kept one that fails is dropped (with a
    warning naming it) and fetched again; errors name where the bad bytes are."""
    data = cache.header(file)
    if data is not None:
        try:
            return _valid(data, size, str(cache.header_path(file))), size
        except CheckpointError as e:
            logger.warning("dropping a bad header from distload's cache and fetching it again: %s", e)
            cache.drop_header(file)
    from huggingface_hub import try_to_load_from_cache

    local = try_to_load_from_cache(repo, file, revision=sha)
    if isinstance(local, str) and os.path.getsize(local) == size:
        data, _ = read_header_bytes(local)   # validated, naming the local file
    elif offline():
        raise CheckpointError(f"{repo}@{sha}: the header of {file} is not in distload's cache "
                              "and HF_HUB_OFFLINE=1 forbids fetching it")
    else:
        data = _valid(_fetch_header(repo, sha, file, size, cancel), size,
                      f"{repo}@{sha}: {file} (its header as {_endpoint()} sent it; nothing was kept)")
    cache.put_header(file, data)
    return data, size


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _shards(repo: str, sha: str, files: dict[str, int]) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to index and the index's weight map (None without an index),
    chosen as for a local directory (`distload.checkpoint.index_checkpoint`)."""
    if INDEX in files:
        weight_map = read_weight_map(download(repo, INDEX, sha))
        return sorted(set(weight_map.values())), weight_map
    if SINGLE in files:
        return [SINGLE], None
    loose = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
    if not loose:
        raise CheckpointError(f"{repo}@{sha}: no safetensors weights ({INDEX}, {SINGLE} or "
                              "*.safetensors); a hub repo must hold safetensors for distload")
    return loose, None


def remote_index(repo: str, revision: str | None, *, cache_dir=None) -> RemoteCheckpoint:
    """Index `repo` at `revision` from its shards' headers (see the module doc). Rank 0
    only; `cache_dir` is distload's cache (`distload.sources.cache.cache_root`), never
    huggingface_hub's.

    Example::

        remote = remote_index("acme/llama", "v1.0")
        plan = ...(remote.index)      # remote.index.root: this node's (future) snapshot dir
    """
    sha, config_path = resolve_commit(repo, revision)
    cache = _CommitCache(repo, sha, cache_dir)
    files, complete = _list_files(repo, sha, cache)
    shards, weight_map = _shards(repo, sha, files)
    unlisted = [f for f in shards if f not in files]
    if unlisted:
        where = "the repo" if complete else "this node's hub cache (HF_HUB_OFFLINE=1: nothing else is known)"
        raise CheckpointError(f"{repo}@{sha}: shard {unlisted[0]} of its {INDEX} is not in {where}")

    cancel = threading.Event()

    def one(file: str) -> tuple[bytes, int]:
        return _header(repo, sha, file, files[file], cache, cancel)

    # raises the first failing shard's error
    headers = dict(zip(shards, thread_map(one, shards, workers=_MAX_FETCHERS, name="distload-hub",
                                          cancel=cancel)))
    # config.json lies in the snapshot: read as a local checkpoint's (bounded, validated)
    index = index_from_headers(os.path.dirname(config_path), headers, weight_map=weight_map)
    support = tuple(sorted(f for f in files if "/" not in f and f not in headers
                           and any(fnmatch.fnmatch(f, p) for p in SUPPORT_PATTERNS)))
    logger.debug("%s@%s: %d shard headers, %d support files", repo, sha, len(headers), len(support))
    return RemoteCheckpoint(index, sha, support)
