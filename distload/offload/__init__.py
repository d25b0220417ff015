"""The offload tiers' machinery: a node's shared, file-locked, content-addressed offload
directory, and streamed execution of weights that live on the CPU or disk tier.

* `OffloadStore` — the directory (one per node, shared by every rank and job): entries
  written once under a lock, atomically, verified; zero-copy references into safetensors
  files; `python -m distload.offload ls|verify|gc DIR` looks after it.
* `ensure_entries` — the entries of some checkpoint tensors, made once, reused after.
* `attach_streaming` — bring a module's offloaded units onto the device just before each
  runs, release them after, prefetch the next ones in the background.

Knows nothing of plans or ranks: `distload.loader` decides what goes where.

Example::

    from distload.offload import OffloadStore, ensure_entries, attach_streaming

    store = OffloadStore("/scratch/offload")
    entries, _ = ensure_entries(store, {n: index.tensors[n] for n in names},
                                checkpoint=index.root)
    attach_streaming(model, ["model.layers.7"], entries, "cuda:0")
"""

from .entry import Entry, EntrySpec, OffloadError, SourceId
from .maintenance import GcResult, foreign_entries, gc_store, list_entries, pending_entries, verify_store
from .populate import ensure_entries
from .store import MANIFEST_VERSION, OffloadStore, default_offload_dir
from .stream import Streamer, StreamStats, attach_streaming, streamer_of

__all__ = [
    "OffloadStore", "Entry", "EntrySpec", "SourceId", "OffloadError", "MANIFEST_VERSION",
    "default_offload_dir", "ensure_entries", "list_entries", "verify_store", "pending_entries",
    "foreign_entries", "gc_store", "GcResult",
    "attach_streaming", "Streamer", "StreamStats", "streamer_of",
]
