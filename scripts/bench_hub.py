"""Hub downloads on two simulated nodes: distload against `snapshot_download` on each node, in one run.

A checkpoint of `--shards` (>= 6) safetensors shards is served by the fake hub (tests/fakehub.py) to the
real huggingface_hub client, each simulated node through its own URL prefix (so the bytes served are
counted per node) and, with `--node-mbps`, at most that bandwidth per node, shared by its connections as
on a node's link. Each run is two `torchrun --nnodes=2 --node_rank=0|1 --master_addr=127.0.0.1`
launches at once, each with its own fresh HF_HOME and DISTLOAD_CACHE (a cold cache: nothing downloaded
before), for each topology (2 nodes x `--nproc` ranks), interleaved, `--repeats` times:

* distload: `distload.load("org/name")`: rank 0 plans from the shards' headers (range requests), each
  node's first rank downloads only the shards its node's ranks read (plus config and tokenizer);
* snapshot: what users do today: each node's first rank `snapshot_download`s the whole repo (config,
  weights, tokenizer), the node's other ranks wait, then every rank loads the local snapshot
  (`distload.load(path)`: the same loader, so only the download differs).

Per topology and system it prints the medians of: MB downloaded per node (every body byte the hub sent
that node, header range reads included) against the whole checkpoint, the seconds from the launch to the
first loaded weight (the earliest rank whose stage's first weights are in memory) and to the whole model
loaded (the last rank) — and the same from the moment the last rank finished its imports ("after
ready": without the interpreter's start, which a loaded machine stretches) — then distload's ratios to
snapshot.

Example::

    python scripts/bench_hub.py --shards 8 --node-mbps 25 --repeats 3
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distload.sources.demo import DEMO_CONFIG, make_checkpoint  # noqa: E402
from distload.sources.hub import HUB_PATTERNS  # noqa: E402
from tests.fakehub import FakeHub, client_env  # noqa: E402
from tests.mp import torchrun_nodes  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_bench_hub_worker.py"
REPO = "bench/llama"
SYSTEMS = ("distload", "snapshot")
MB = 1e6
PATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # the workers import this checkout


def run_once(hub: FakeHub, system: str, nproc: int, work: Path, timeout: float) -> dict:
    """Two launches (nodes) of `nproc` ranks each, fresh caches; the figures of this run."""
    work.mkdir(parents=True)
    hub.reset()
    t0 = time.time()
    envs = [client_env(hub.url(f"node{n}"), work / f"node{n}") | {"HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": PATH}
            for n in (0, 1)]
    for code, log in torchrun_nodes([nproc, nproc], [str(WORKER), system, str(work), REPO, repr(t0)], envs,
                                    timeout=timeout):
        if code != 0:
            raise SystemExit(f"{system} on 2 x {nproc} failed:\n{log[-3000:]}")
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2 * nproc)]
    served: dict[str, int] = {}
    for r in hub.stats()["log"]:
        if r["bytes"]:
            served[r["node"]] = served.get(r["node"], 0) + r["bytes"]
    ready = max(r["ready_s"] for r in ranks)  # the last rank's imports done: the job's work begins
    first, loaded = min(r["first_weight_s"] for r in ranks), max(r["loaded_s"] for r in ranks)
    return {"node_bytes": [served.get(f"node{n}", 0) for n in (0, 1)], "first_weight_s": first,
            "loaded_s": loaded, "first_after_ready_s": first - ready, "loaded_after_ready_s": loaded - ready}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--shards", type=int, default=8, help="safetensors shards (>= 6)")
    p.add_argument("--nproc", default="1,2", help="ranks per node of each topology (2 nodes each)")
    p.add_argument("--node-mbps", type=float, default=25.0, help="bandwidth per node in MB/s (0: no limit)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", help="write every run's figures here")
    args = p.parse_args(argv)
    if args.shards < 6:
        p.error("--shards must be at least 6")
    topologies = [int(n) for n in args.nproc.split(",")]
    config = {**DEMO_CONFIG, "num_hidden_layers": args.layers, "hidden_size": args.hidden,
              "intermediate_size": 3 * args.hidden}
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        ckpt = make_checkpoint(config, Path(tmp) / "ckpt", num_shards=args.shards, dtype="float32")
        (ckpt / "tokenizer_config.json").write_text("{}")
        files = {f.name: f.stat().st_size for f in ckpt.iterdir()}
        whole = sum(size for name, size in files.items() if any(fnmatch.fnmatch(name, pat) for pat in HUB_PATTERNS))
        shards = sum(1 for name in files if name.endswith(".safetensors"))
        print(f"checkpoint: {shards} shards, {whole / MB:.1f} MB to download in all (config, weights, tokenizer); "
              f"2 simulated nodes on one machine, "
              f"{f'{args.node_mbps:g} MB/s per node' if args.node_mbps else 'no bandwidth limit'}; "
              f"{args.repeats} run(s) each, fresh caches every run; cpu ranks; the machine may be shared")
        runs: dict[tuple[int, str], list[dict]] = {}
        with FakeHub() as hub:
            hub.push(REPO, ckpt)
            hub.limit_bandwidth(args.node_mbps * MB if args.node_mbps else None)
            for repeat in range(args.repeats):
                for nproc in topologies:
                    for system in SYSTEMS:
                        figures = run_once(hub, system, nproc, Path(tmp) / f"run-{repeat}-{nproc}-{system}",
                                           args.timeout)
                        runs.setdefault((nproc, system), []).append(figures)
                        print(f"  run {repeat + 1}: 2 x {nproc} {system:<8} node MB "
                              f"{figures['node_bytes'][0] / MB:.1f} / {figures['node_bytes'][1] / MB:.1f}, "
                              f"first weight {figures['first_weight_s']:.2f} s "
                              f"({figures['first_after_ready_s']:.2f} s after ready), "
                              f"loaded {figures['loaded_s']:.2f} s",
                              flush=True)
    med = {key: {"node_mb": [statistics.median(r["node_bytes"][n] for r in rs) / MB for n in (0, 1)],
                 "first": statistics.median(r["first_weight_s"] for r in rs),
                 "loaded": statistics.median(r["loaded_s"] for r in rs),
                 "first_ready": statistics.median(r["first_after_ready_s"] for r in rs),
                 "loaded_ready": statistics.median(r["loaded_after_ready_s"] for r in rs)}
           for key, rs in runs.items()}
    print(f"\nmedians of {args.repeats} run(s); whole checkpoint {whole / MB:.1f} MB")
    print(f"{'nodes x ranks':<14} {'system':<9} {'node0 MB':>9} {'node1 MB':>9} {'node0/whole':>11} "
          f"{'node1/whole':>11} {'first weight s':>15} {'loaded s':>9} {'first, after ready':>19} "
          f"{'loaded, after ready':>20}")
    for (nproc, system), m in med.items():
        print(f"{f'2 x {nproc}':<14} {system:<9} {m['node_mb'][0]:>9.1f} {m['node_mb'][1]:>9.1f} "
              f"{m['node_mb'][0] / (whole / MB):>11.2f} {m['node_mb'][1] / (whole / MB):>11.2f} "
              f"{m['first']:>15.2f} {m['loaded']:>9.2f} {m['first_ready']:>19.2f} {m['loaded_ready']:>20.2f}")
    print("\ndistload / snapshot_download:")
    for nproc in topologies:
        d, s = med[(nproc, "distload")], med[(nproc, "snapshot")]
        print(f"  2 x {nproc}: bytes per node {d['node_mb'][0] / s['node_mb'][0]:.2f} (node 0), "
              f"{d['node_mb'][1] / s['node_mb'][1]:.2f} (node 1); all nodes "
              f"{sum(d['node_mb']) / sum(s['node_mb']):.2f}; time to first weight {d['first'] / s['first']:.2f} "
              f"({d['first_ready'] / s['first_ready']:.2f} after ready); to loaded model "
              f"{d['loaded'] / s['loaded']:.2f} ({d['loaded_ready'] / s['loaded_ready']:.2f} after ready)")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{n}x{s}": rs for (n, s), rs in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
