"""`--verify-checksums`: every file a node's ranks read, hashed whole before any rank
reads it, against a digest this node did not compute from the same bytes.

* hub files: the digest the hub gives (huggingface_hub names each blob in its cache by its
  ETag: an LFS file's sha256, a git file's blob sha1), so a byte flipped on disk after the
  download, or by a proxy during it, is caught;
* local files: a manifest of sha256 digests in distload's cache, written on the first
  verified load of that directory (trust on first use) and checked on every later one;
  files it does not list yet are added.

Without the flag nothing is hashed: sizes are checked (a download's against the hub's
listing, every safetensors header against its file), not contents. The node's leader
reads each file whole — opt-in, since each rank otherwise reads only its own bytes.

Example::

    verify_hub_files(snapshot, ["model-00001-of-00002.safetensors"], label="acme/llama@<sha>")
    verify_local_files("/models/llama", ["model.safetensors"], cache_dir=None)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from .cache import cache_root
from ..checkpoint.files import FILE_CHUNK_BYTES, open_checkpoint_file
from ..errors import CheckpointError
from ..log import logger

__all__ = ["file_digest", "verify_hub_files", "verify_local_files", "manifest_path"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


def file_digest(path: str, kind: str = "sha256", *, git_blob: bool = False) -> str:
    """The hex digest of the file at `path` (read in 16 MiB chunks; a signal stops it
    between chunks). `git_blob`: git's blob id (sha1 of ``"blob <size>\\0"`` + content)."""
    fd, size = open_checkpoint_file(path, "its checksum")
    h = hashlib.new(kind)
    if git_blob:
        h.update(b"blob %d\0" % size)
    try:
        with os.fdopen(fd, "rb", buffering=0) as f:
            while chunk := f.read(FILE_CHUNK_BYTES):
                h.update(chunk)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} (its checksum): {e.strerror}") from e
    return h.hexdigest()


def verify_hub_files(snapshot: str, files: Sequence[str], *, label: str) -> int:
    """Check each of `files` (relative to the hub cache's `snapshot` directory) against the
    digest the hub gave for it (its blob's name). Returns how many were checked; raises
    `CheckpointError` naming the blob at fault."""
    checked = 0
    for name in sorted(set(files)):
        path = os.path.join(snapshot, name)
        blob = os.path.realpath(path)
        etag = os.path.basename(blob)
        if _SHA256.fullmatch(etag):
            got, what = file_digest(blob), "sha256"
        elif _SHA1.fullmatch(etag):
            got, what = file_digest(blob, "sha1", git_blob=True), "git blob sha1"
        else:
            raise CheckpointError(f"{path}: the hub cache gives no digest for it (blob {etag}), so "
                                  "--verify-checksums cannot check it")
        if got != etag:
            raise CheckpointError(f"{blob} ({name} of {label}) has {what} {got}, but the hub gives "
                                  f"{etag}: the file is corrupt; delete it and run again")
        checked += 1
    logger.info("checksums of %d file(s) of %s match the hub's", checked, label)
    return checked


def manifest_path(root: str, cache_dir=None) -> Path:
    """Where the checksum manifest of local checkpoint directory `root` lives."""
    real = os.path.realpath(root)
    tag = hashlib.sha256(real.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "checksums" / f"{os.path.basename(real) or 'root'}-{tag}.json"


def verify_local_files(root: str, files: Sequence[str], *, cache_dir=None) -> int:
    """Check each of `files` (relative to `root`) against the manifest of `root` (see the
    module doc), recording files it does not list yet. Returns how many were checked
    against a recorded digest; raises `CheckpointError` naming the file that changed."""
    manifest = manifest_path(root, cache_dir)
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        recorded = {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest} (the checksums of {root}) is unreadable ({e}); delete it "
                              "to record them again") from None
    checked, added = 0, {}
    for name in sorted(set(files)):
        path = os.path.join(root, name)
        got = file_digest(path)
        want = recorded.get(name)
        if want is None:
            added[name] = got
        elif got != want:
            raise CheckpointError(f"{path} has sha256 {got}, but {want} was recorded in {manifest} "
                                  "when it was first verified: the file changed (a flipped byte, a "
                                  "partial copy); if it was replaced on purpose, delete that manifest")
        else:
            checked += 1
    if added:
        _write(manifest, {"root": os.path.realpath(root), "files": {**recorded, **added}})
        logger.info("recorded the sha256 of %d file(s) of %s in %s: later runs with "
                    "--verify-checksums are checked against it", len(added), root, manifest)
    if checked:
        logger.info("checksums of %d file(s) of %s match %s", checked, root, manifest)
    return checked


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot write the checksum manifest {path}: {e.strerror}") from e
