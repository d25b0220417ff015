"""Peak resident memory of one process during a forward with half of the layers on the
disk tier (or none), sampled by a thread every millisecond and at every unit's hooks.

    MALLOC_MMAP_THRESHOLD_=65536 python offload_memory.py CKPT OFFLOAD_DIR disk|none OUT.json

The fixed mmap threshold makes freed tensors go back to the OS at once, so RSS follows
what is live (glibc's adaptive threshold would keep freed weights in its heap)."""

import json
import os
import sys
import threading
import time

import psutil
import torch

import distload
from distload.models import build_model
from offload_common import install_tiers

ckpt, offload_dir, tier, out = sys.argv[1:5]
proc = psutil.Process()
if tier != "none":
    install_tiers(tier)
ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
# One-off costs go into the baseline: torch's kernels, and the modules the meta device
# imports on first use (~70 MB of Python objects).
with torch.no_grad():
    torch.nn.Linear(64, 64)(torch.randn(32, 64))
with torch.device("meta"):
    build_model({**json.load(open(os.path.join(ckpt, "config.json"))), "num_hidden_layers": 1})
base = proc.memory_info().rss
pipe = distload.load(ckpt, device="cpu", offload_dir=offload_dir)
after_load = proc.memory_info().rss
peak = after_load
stop = threading.Event()


def note(*_) -> None:
    global peak
    peak = max(peak, proc.memory_info().rss)


def sample() -> None:
    while not stop.is_set():
        note()
        time.sleep(0.001)


for layer in pipe.module.model.layers.values():   # the moments of most weights resident
    layer.register_forward_pre_hook(note)
    layer.register_forward_hook(note)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
with torch.no_grad():
    for _ in range(2):
        pipe.forward(ids)
stop.set()
thread.join()
streamer = distload.offload.streamer_of(pipe.module)
resident = sum(p.numel() * p.element_size() for p in pipe.module.parameters() if not p.is_meta)
units = {u: pipe.plan.unit_bytes[u] for u in (streamer.unit_names if streamer else [])}
with open(out, "w") as f:
    json.dump({"base": base, "after_load": after_load, "peak": peak, "resident_param_bytes": resident,
               "offloaded_unit_bytes": units, "max_resident": streamer.max_resident if streamer else 0,
               "peak_resident_bytes": streamer.stats.peak_resident_bytes if streamer else 0,
               "model_bytes": pipe.plan.checkpoint_bytes}, f)
