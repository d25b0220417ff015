"""Which file system a path lies on, and whether it is a network one.

The offload directory must be node-local: its entries are written under `flock` locks,
which NFS, Lustre, GPFS, CIFS and many FUSE file systems either ignore or honour only on
one client, so ranks of two nodes sharing one directory could write an entry at once.
`warn_if_network` says so when a store opens such a directory.

Example::

    filesystem_type("/scratch/offload")     # "xfs", "nfs4", "lustre", ... (None off Linux)
    is_network_filesystem("nfs4")           # True
"""

from __future__ import annotations

import os

from ..log import logger

__all__ = ["filesystem_type", "is_network_filesystem", "warn_if_network", "NETWORK_FILESYSTEMS"]

# Kinds from /proc/mounts (the third field) where one node's lock may not hold on another.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "cephfs", "glusterfs",
    "beegfs", "pvfs2", "orangefs", "ocfs2", "gfs2", "9p", "afs", "panfs", "wekafs", "fuse",
})
_warned: set[str] = set()


def _unescape(field: str) -> str:
    # /proc/mounts writes a space as \040, a tab as \011, a backslash as \134
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def filesystem_type(path: str | os.PathLike, *, mounts: str = "/proc/mounts") -> str | None:
    """The type of the file system holding `path` (its nearest existing ancestor): the
    mount with the longest mount point above it in `mounts`. None where that cannot be
    read (not Linux)."""
    path = os.path.realpath(os.path.expanduser(os.fspath(path)))
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # a later mount over the same point wins
            best, kind = point, fields[2]
    return kind


def is_network_filesystem(kind: str | None) -> bool:
    """Whether file locks may not hold across nodes on a file system of type `kind`
    (``fuse.*`` counted: sshfs, s3fs, gcsfuse, juicefs ...)."""
    return kind is not None and (kind in NETWORK_FILESYSTEMS or kind.startswith("fuse."))


def warn_if_network(path: str | os.PathLike, what: str = "the offload directory") -> bool:
    """Log a warning (once per path and process) when `path` is on a network file system;
    returns whether it is."""
    kind = filesystem_type(path)
    if not is_network_filesystem(kind):
        return False
    key = os.path.realpath(os.fspath(path))
    if key not in _warned:
        _warned.add(key)
        logger.warning("%s %s is on a %s file system, where file locks may not hold across nodes: "
                       "give each node a local one (--offload-dir on local disk, e.g. /tmp or /scratch)",
                       what, key, kind)
    return True
