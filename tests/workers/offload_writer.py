"""A process that stops in the middle of something, to be SIGKILLed there.

    python offload_writer.py CKPT DIR DTYPE READY_FILE write|hold

`write`: starts writing the entries of CKPT but stops half-way through the first entry
file (after some bytes of it reached the disk), creates READY_FILE and sleeps.
`hold`: takes the lock stripe of the first entry, creates READY_FILE and sleeps."""

import os
import sys
import time

import distload.offload.store as store_mod
from distload.checkpoint import index_checkpoint
from distload.offload import EntrySpec, OffloadStore, ensure_entries

ckpt, root, dtype, ready, mode = sys.argv[1:6]
dtype = None if dtype == "none" else dtype
index = index_checkpoint(ckpt)
store = OffloadStore(root)


def stop_here() -> None:
    open(ready, "w").close()
    time.sleep(600)


if mode == "hold":
    first = min(EntrySpec.from_meta(m, dtype).key for m in index.tensors.values())
    with store.stripe_lock(first):
        stop_here()
else:
    def write_half(fd, view):
        os.write(fd, view[: max(1, len(view) // 2)])
        os.fsync(fd)
        stop_here()

    store_mod._write_all = write_half
    ensure_entries(store, index.tensors, checkpoint=index.root, dtype=dtype)
