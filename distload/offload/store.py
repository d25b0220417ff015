"""The shared offload directory: content-addressed entries, written once under a lock,
visible only when complete and verified; and the manifest of which models need them.

One directory per node serves every rank and every job on it::

    DIR/manifest.json        versioned JSON: model -> the entry keys it needs
    DIR/manifest.lock        filelock guarding manifest updates
    DIR/locks/<xx>.lock      256 lock stripes; entry KEY is written under locks/KEY[:2].lock
    DIR/data/<xx>/<key>      the entries (see `entry.py`), each a safetensors file

Who calls what: any process, any time. `ensure` is safe with any number of concurrent
processes: exactly one writes a missing entry, the others wait for it (at most `timeout_s`
seconds) and reuse it. A write goes to a temporary file in the entry's directory, is
fsynced, read back and checked (size and checksum), and only then renamed into place, so a
writer killed at any moment leaves nothing visible. Locks are `fcntl.flock` locks: they die
with their process, so no stale lock outlives a crashed job.

Example::

    store = OffloadStore("~/.cache/distload/offload")
    entry = store.ensure(EntrySpec.from_meta(meta), lambda: read_tensor(meta))
    weight = entry.read()
    store.bytes_written        # 0 on a rerun
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from ..sources.cache import cache_root
from ..checkpoint.files import FILE_CHUNK_BYTES, byte_view
from ..dist import DEFAULT_TIMEOUT_S
from ..log import logger
from .entry import (KIND_COPY, KIND_REF, Entry, EntrySpec, OffloadError, checksum_bytes,
                    checksum_file, encode_header, not_regular, open_regular, read_entry_file,
                    tensor_bytes)
from .fs import warn_if_network

__all__ = ["MANIFEST_VERSION", "OffloadStore", "default_offload_dir", "model_id"]

MANIFEST_VERSION = 1
_DIR_MODE = 0o755


def default_offload_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/offload``, the cache being `cache_dir`, else ``$DISTLOAD_CACHE``, else
    ``~/.cache/distload`` (where the demo checkpoint lives too)."""
    return cache_root(cache_dir) / "offload"


def model_id(checkpoint: str, dtype: str | None) -> str:
    """The manifest's name for a (checkpoint, dtype) pair."""
    return f"{os.path.realpath(checkpoint)}::{dtype or 'native'}"


class OffloadStore:
    """An offload directory (created if missing). `timeout_s`: seconds to wait for another
    process's write of an entry this one needs. `zero_copy`: store a reference to the
    source byte range instead of a copy where no cast is needed."""

    def __init__(self, root: str | os.PathLike, *, timeout_s: float = DEFAULT_TIMEOUT_S, zero_copy: bool = True):
        self.root = Path(root).expanduser().resolve()
        self.timeout_s = timeout_s
        self.zero_copy = zero_copy
        self.bytes_written = 0      # bytes this process wrote into the directory
        self.entries_written = 0
        self.repaired = 0           # corrupt entries found and rewritten
        try:  # nobody but its owner may write into it: entries are trusted once verified
            self.root.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            (self.root / "data").mkdir(exist_ok=True, mode=_DIR_MODE)
            (self.root / "locks").mkdir(exist_ok=True, mode=_DIR_MODE)
        except OSError as e:
            what = "cannot write into" if self.root.is_dir() else "cannot create"   # an existing one may be read-only
            raise OffloadError(f"{what} the offload directory {self.root}: {e.strerror} "
                               "(choose another with offload_dir= / --offload-dir)") from e
        self.check_dir(self.root / "data")
        if os.environ.get("LOCAL_RANK", "0") == "0":  # the node's first rank speaks for the node
            warn_if_network(self.root)

    # ------------------------------------------------------------------ paths and locks
    def entry_file(self, key: str) -> Path:
        return self.root / "data" / key[:2] / key

    def check_dir(self, path: Path) -> None:
        """Raise `OffloadError` unless `path` (``data`` or ``data/<xx>``) is a real directory
        or absent: a symlink there would take reads, writes and `gc` out of the store."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            kind = not_regular(path) or "a file"
            raise OffloadError(f"{path} is {kind}, not a directory: the offload store never "
                               "follows links out of itself; remove it (or choose another --offload-dir)")

    def stripe_lock(self, key: str, timeout_s: float | None = None) -> FileLock:
        return FileLock(str(self.root / "locks" / f"{key[:2]}.lock"),
                        timeout=self.timeout_s if timeout_s is None else timeout_s)

    def manifest_lock(self) -> FileLock:
        return FileLock(str(self.root / "manifest.lock"), timeout=self.timeout_s)

    # ------------------------------------------------------------------ entries
    def lookup(self, key: str, *, verify: bool = False) -> Entry | None:
        """The complete entry `key`, or None if there is none (or, with `verify`, it fails
        its checks — see `probe`)."""
        entry, problem = self.probe(key, verify=verify)
        return entry if problem is None else None

    def probe(self, key: str, *, verify: bool = True) -> tuple[Entry | None, str | None]:
        """(entry, problem): (None, None) when absent; a problem when the file is
        malformed, truncated or (with `verify`) its bytes fail their checksum."""
        path = self.entry_file(key)
        self.check_dir(path.parent)
        kind = not_regular(path)
        if kind is not None:   # rewritten by `ensure` (a name replaced, nothing followed)
            return None, f"{path} is {kind}, not an entry file"
        if not os.path.lexists(path):
            return None, None
        try:
            entry = read_entry_file(str(path))
        except (OffloadError, OSError) as e:
            return None, str(e)
        if entry.key != key:
            return None, f"holds key {entry.key[:12]}"
        if verify:
            return entry, entry.verify()
        size = path.lstat().st_size
        if entry.kind == KIND_COPY and size != entry.offset + entry.nbytes:
            return entry, f"size {size} != {entry.offset + entry.nbytes} bytes"
        if entry.kind == KIND_REF and not entry.source.current():
            return entry, f"source {entry.source.file} changed or is gone"
        return entry, None

    def ensure(self, spec: EntrySpec, produce: Callable[[], torch.Tensor], *, verify: bool = True) -> Entry:
        """The entry for `spec`, written now if it is missing or corrupt (with a warning),
        else reused as it is. A zero-copy reference only checksums the source's bytes; a
        copy calls `produce()` for the tensor (any dtype and device; cast to `spec.dtype`).
        Raises `OffloadError` after `timeout_s` seconds waiting for another writer."""
        key = spec.key
        entry, problem = self.probe(key, verify=verify)
        if entry is not None and problem is None:
            return entry
        lock = self.stripe_lock(key)
        try:
            lock.acquire()
        except Timeout:
            raise OffloadError(
                f"waited {self.timeout_s:g} s for {lock.lock_file} to write offload entry {key[:12]} "
                f"({spec.name}): another process holds it and has not finished. Locks die with "
                "their process, so a crashed job cannot cause this; a stuck one can.") from None
        try:
            entry, problem = self.probe(key, verify=verify)  # written or repaired meanwhile?
            if entry is not None and problem is None:
                return entry
            if problem is not None:
                logger.warning("offload entry %s (%s) in %s is corrupt (%s): rewriting it",
                               key[:12], spec.name, self.root, problem)
                self.repaired += 1
            self._remove_temporaries(key)
            return self._write(spec, produce)
        finally:
            lock.release()

    def _write(self, spec: EntrySpec, produce: Callable[[], torch.Tensor]) -> Entry:
        # A reference needs only the checksum of the source's bytes: nothing is produced.
        kind = KIND_REF if self.zero_copy and spec.can_reference and spec.source.current() else KIND_COPY
        if kind == KIND_REF:
            view, checksum = memoryview(b""), checksum_file(spec.source.file, spec.offset, spec.nbytes)
        else:
            tensor = produce()
            if tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.name}: produced shape {tuple(tensor.shape)} != {spec.shape}")
            data = tensor_bytes(tensor, spec.dtype)  # held while `view` is used: it owns the bytes
            view = byte_view(data)
            checksum = checksum_bytes(view)
        final = self.entry_file(spec.key)
        self.check_dir(final.parent)
        final.parent.mkdir(exist_ok=True, mode=_DIR_MODE)
        if os.path.isdir(final) and not os.path.islink(final):
            raise OffloadError(f"{final} is a directory where offload entry {spec.key[:12]} "
                               f"({spec.name}) belongs: remove it")
        tmp = final.parent / f".{spec.key}.tmp.{os.getpid()}.{secrets.token_hex(4)}"
        header = encode_header(spec, spec.key, kind, checksum)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                _write_all(fd, memoryview(header))
                if kind == KIND_COPY:
                    _write_all(fd, view)
                os.fsync(fd)
            finally:
                os.close(fd)
            written = read_entry_file(str(tmp))   # read back what landed before publishing it
            size = tmp.stat().st_size
            expected = len(header) + (spec.nbytes if kind == KIND_COPY else 0)
            if size != expected or (kind == KIND_COPY and
                                    checksum_file(str(tmp), written.offset, spec.nbytes) != checksum):
                raise OffloadError(f"offload entry {tmp} did not read back as written "
                                   f"({size} of {expected} bytes): is the disk full or failing?")
            os.replace(tmp, final)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OffloadError(f"{self.root}: {exc.strerror} while writing offload entry "
                                   f"{spec.key[:12]} ({spec.name}, {spec.nbytes} bytes); nothing "
                                   "half-written was left; free space there or choose another "
                                   "--offload-dir") from None
            raise
        _fsync_dir(final.parent)
        self.bytes_written += expected
        self.entries_written += 1
        return read_entry_file(str(final))

    def _remove_temporaries(self, key: str) -> None:
        """Leftovers of a writer of `key` that died mid-write (the caller holds the stripe
        lock, so no live writer of `key` exists)."""
        parent = self.entry_file(key).parent
        self.check_dir(parent)
        for tmp in parent.glob(f".{key}.tmp.*"):
            tmp.unlink(missing_ok=True)   # unlink removes a link itself, never its target

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict:
        """The manifest: ``{"version": 1, "models": {id: {"checkpoint", "dtype", "keys"}}}``."""
        path = self.root / "manifest.json"
        try:
            with os.fdopen(open_regular(path), "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            return {"version": MANIFEST_VERSION, "models": {}}
        except ValueError as e:
            raise OffloadError(f"{path} is not valid JSON ({e}); move it away and run "
                               f"`python -m distload.offload gc {self.root}`") from None
        if manifest.get("version") != MANIFEST_VERSION:
            raise OffloadError(f"{path} has version {manifest.get('version')}; this distload "
                               f"reads version {MANIFEST_VERSION}: use another --offload-dir")
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        """Replace the manifest atomically; the caller holds `manifest_lock()`."""
        path = self.root / "manifest.json"
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        tmp = path.with_name(f".manifest.json.tmp.{os.getpid()}")
        tmp.unlink(missing_ok=True)   # a leftover of a killed writer with this pid
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.root)
        self.bytes_written += len(text)

    def register(self, checkpoint: str, dtype: str | None, keys: Iterable[str]) -> None:
        """Record that the model (checkpoint, dtype) needs entries `keys` (added to what
        other ranks and jobs recorded). Call before making the entries, so `gc` never
        removes an entry a load is about to use. Writes nothing if already recorded."""
        mid, keys = model_id(checkpoint, dtype), set(keys)
        if keys <= set(self.read_manifest()["models"].get(mid, {}).get("keys", ())):
            return
        with self.manifest_lock():
            manifest = self.read_manifest()
            record = manifest["models"].setdefault(
                mid, {"checkpoint": os.path.realpath(checkpoint), "dtype": dtype, "keys": []})
            if not keys <= set(record["keys"]):
                record["keys"] = sorted(keys | set(record["keys"]))
                self.write_manifest(manifest)


def _write_all(fd: int, view: memoryview) -> None:
    for start in range(0, len(view), FILE_CHUNK_BYTES):
        chunk = view[start:start + FILE_CHUNK_BYTES]
        while len(chunk):
            chunk = chunk[os.write(fd, chunk):]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
