"""One of several processes that populate one offload directory at once.

    python offload_populate.py CKPT DIR DTYPE BARRIER_DIR N OUT.json

Waits until all N processes are ready (each leaves a file in BARRIER_DIR after its
imports), so that they really start together; then makes the entries of every
tensor of CKPT as DTYPE, then reads each back and compares it with safetensors' own
reader. Writes what it wrote and what mismatched to OUT.json."""

import json
import os
import sys
import time

import torch
from safetensors import safe_open

from distload.checkpoint import index_checkpoint
from distload.offload import OffloadStore, ensure_entries

ckpt, root, dtype, barrier, count, out = sys.argv[1:7]
dtype = None if dtype == "none" else dtype
index = index_checkpoint(ckpt)
store = OffloadStore(root, timeout_s=60)
open(os.path.join(barrier, str(os.getpid())), "w").close()
deadline = time.time() + 60
while len(os.listdir(barrier)) < int(count) and time.time() < deadline:
    time.sleep(0.005)
entries, read = ensure_entries(store, index.tensors, checkpoint=index.root, dtype=dtype)
mismatches = []
for name, entry in entries.items():
    meta = index.tensors[name]
    with safe_open(meta.file, "pt") as f:
        ref = f.get_tensor(name)
    if dtype is not None:
        ref = ref.to(getattr(torch, dtype))
    got = entry.read()
    if got.dtype != ref.dtype or not torch.equal(got, ref):
        mismatches.append(name)
with open(out, "w") as f:
    json.dump({"pid": os.getpid(), "entries_written": store.entries_written, "entries": len(entries),
               "bytes_written": store.bytes_written, "read": read, "mismatches": mismatches,
               "kinds": sorted({e.kind for e in entries.values()})}, f)
