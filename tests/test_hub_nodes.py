"""Hub ids on two simulated nodes: two `torchrun --nnodes=2 --node_rank=0|1` launches on this machine
(node 0 with one rank, node 1 with two), each with its own HF_HOME, DISTLOAD_CACHE and node prefix in
HF_ENDPOINT, against the fake hub (tests/fakehub.py) and the real huggingface_hub client.

One launch loads several repos in turn (tests/workers/hub_load.py); a second, offline, reuses its caches.
Checked: each node downloads exactly the shards its ranks read (bytes the hub served per node), rank 0 plans
from range requests alone, tensors equal safetensors' reading of the original files, a rerun downloads
nothing, an offline rerun makes no request, budgets are per node, and a shard missing, truncated or cut
short by the server fails every rank within 60 s with a message naming it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distload.sources.demo import make_checkpoint

from .conftest import tiny_config
from .fakehub import FakeHub, client_env
from .mp import torchrun_nodes, worker

pytestmark = pytest.mark.multiprocess

REPO = "acme/tiny"
NPROCS = (1, 2)                 # ranks on node 0 and node 1
LAST = "model-00006-of-00006.safetensors"    # holds lm_head: node 1 reads it, node 0 does not
FIRST = "model-00001-of-00006.safetensors"   # holds embed_tokens: node 0 only
FAULTS = {  # repo -> the fault that breaks it (the same files as REPO)
    "acme/missing": dict(file=LAST, kind="missing", node="node1"),
    "acme/trunc": dict(file=LAST, kind="truncate", node="node1"),
    "acme/short": dict(file=LAST, kind="short", node="node1"),
    "acme/gone": dict(file="model-00003-of-00006.safetensors", kind="missing"),  # on every node: no header
}
SLOW = ("acme/slow", dict(file=LAST, kind="slow", node="node1", delay=5.0))  # 3 chunks of 64 KiB: 15 s
TIMEOUT = 10  # the process group's, seconds: node 1's slow download takes longer
CPU_BUDGET = 10**9


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """6 layers in 6 float32 shards, a tokenizer file (every node takes it), a README and a file in a
    subfolder (nobody takes those)."""
    d = tmp_path_factory.mktemp("hubnodes") / "tiny"
    make_checkpoint(tiny_config(num_hidden_layers=6), d, num_shards=6, dtype="float32", seed=3)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "README.md").write_text("# tiny\n")
    (d / "original").mkdir()
    (d / "original" / "params.json").write_text("{}")
    return d


@pytest.fixture(scope="module")
def hub(source):
    with FakeHub() as hub:
        for repo in (REPO, *FAULTS):
            hub.push(repo, source)
        hub.create_ref(REPO, "v1")
        hub.push(SLOW[0], source)
        for repo, fault in [*FAULTS.items(), SLOW]:
            hub.add_fault(repo=repo, **fault)
        yield hub


def two_nodes(hub: FakeHub, source: Path, homes: Path, out: Path, specs: list[str], *, offline: bool = False,
              timeout: float = 240) -> list[list[dict]]:
    """Both launches at once; per load in `specs`, each rank's result."""
    envs = [client_env(hub.url(f"node{n}"), homes / f"node{n}", offline=offline) for n in range(len(NPROCS))]
    for code, log in torchrun_nodes(list(NPROCS), [worker("hub_load.py"), str(out), str(source), *specs], envs,
                                    timeout=timeout):
        assert code == 0, log[-4000:]
    loads = sum(not s.startswith("@") for s in specs)
    return [[json.loads((out / str(i) / f"rank{r}.json").read_text()) for r in range(sum(NPROCS))]
            for i in range(loads)]


@pytest.fixture(scope="module")
def runs(hub, source, tmp_path_factory):
    homes = tmp_path_factory.mktemp("homes")
    specs = [f"@timeout={TIMEOUT}", f"@max_memory={json.dumps({'cpu': CPU_BUDGET})}", REPO, REPO, *FAULTS, SLOW[0]]
    return homes, two_nodes(hub, source, homes, tmp_path_factory.mktemp("out"), specs)


def node_of(rank: int) -> int:
    return 0 if rank < NPROCS[0] else 1


def served(stats: dict, node: int, kinds: tuple[str, ...]) -> dict[str, int]:
    """Body bytes the hub sent to `node`, per file, by requests of `kinds` ("get": whole files, "range")."""
    out: dict[str, int] = {}
    for r in stats["log"]:
        if r["node"] == f"node{node}" and r["kind"] in kinds and r["bytes"]:
            out[r["file"]] = out.get(r["file"], 0) + r["bytes"]
    return out


def test_each_node_downloads_the_shards_of_its_ranks(runs, source):
    homes, results = runs
    first = results[0]
    assert all(r["ok"] for r in first), [r.get("error") for r in first]
    support = {"config.json", "model.safetensors.index.json", "tokenizer.json"}
    size = {f: (source / f).stat().st_size for f in [*support, *(p.name for p in source.glob("*.safetensors"))]}
    for node in (0, 1):
        ranks = [r for rank, r in enumerate(first) if node_of(rank) == node]
        needed = {f for r in ranks for f in r["files"]}
        assert FIRST in needed if node == 0 else LAST in needed
        assert (LAST if node == 0 else FIRST) not in needed          # a node never takes what it does not read
        want = {f: size[f] for f in needed | support}
        assert served(first[0]["stats"], node, ("get",)) == want
        snapshot = Path(ranks[0]["root"])
        assert snapshot.is_relative_to(homes / f"node{node}" / "hf")  # huggingface_hub's cache, not distload's
        assert sorted(os.listdir(snapshot)) == sorted(want)
        # the leader's report carries the node's download (on node 0, but for the config and index that
        # rank 0 took to plan); its other ranks' none
        planned = size["config.json"] + size["model.safetensors.index.json"] if node == 0 else 0
        fetched = [r["report"]["fetched_bytes"] for r in ranks]
        assert fetched[0] == sum(want.values()) - planned and not any(fetched[1:])
    # rank 0 (node 0) planned from headers: one range read of each shard, none whole for node 1's shards
    ranged = served(first[0]["stats"], 0, ("range",))
    assert sorted(ranged) == sorted(f for f in size if f.endswith(".safetensors"))
    assert all(n <= 100_000 for n in ranged.values())
    assert served(first[0]["stats"], 1, ("range",)) == {}


def test_tensors_bit_exact_and_budgets_per_node(runs, source):
    _, results = runs
    first = results[0]
    for rank, r in enumerate(first):
        assert r["checked"] > 0 and r["mismatches"] == [] and r["meta_left"] == []
        assert r["report"]["bytes_read"] == r["report"]["tensor_bytes"]
        assert r["node_ranks"] == ([0] if node_of(rank) == 0 else [1, 2])
        # a CPU rank's device budget is its node's host budget shared by the node's ranks
        assert [b["device"] for b in r["budgets"]] == [CPU_BUDGET, CPU_BUDGET // 2, CPU_BUDGET // 2]
    assert r["file_sizes"] == {p.name: p.stat().st_size for p in source.glob("*.safetensors")}


def test_rerun_downloads_nothing(runs):
    _, results = runs
    rerun = results[1]
    assert all(r["ok"] and r["mismatches"] == [] for r in rerun)
    stats = rerun[0]["stats"]
    for node in (0, 1):
        assert served(stats, node, ("get", "range")) == {}
    # a branch is resolved again (one HEAD of config.json, on rank 0's node); nothing else is asked
    asked = [(r["node"], r["kind"], r["file"]) for r in stats["log"] if r["kind"] != "api"]
    assert asked == [("node0", "head", "config.json")]
    assert all(r["report"]["fetched_bytes"] == 0 for r in rerun)


@pytest.mark.parametrize("case", range(len(FAULTS)))
def test_server_faults_fail_every_rank_naming_the_shard(runs, case):
    _, results = runs
    repo, fault = list(FAULTS.items())[case]
    failed = results[2 + case]
    for rank, r in enumerate(failed):
        assert not r["ok"], f"{repo}: rank {rank} loaded"
        assert fault["file"] in r["error"] and repo in r["error"], r["error"]
        assert r["seconds"] < 60
    if fault.get("node") == "node1":  # node 1's leader failed; node 0 and node 1's other rank hear of it
        assert failed[1]["error"].startswith("CheckpointError")
        assert failed[0]["error"].startswith("RankError: rank 1 (the leader of node 1")
    else:  # rank 0 could not read the header: nothing was downloaded anywhere
        assert failed[0]["error"].startswith("CheckpointError")
        assert not any(served(failed[0]["stats"], n, ("get",)).get(fault["file"]) for n in (0, 1))


def test_a_download_longer_than_the_process_group_timeout(runs):
    """Node 1's leader downloads for 15 s; node 0's rank and node 1's other rank wait on the job's store,
    not in a collective that would fail after the process group's 10 s."""
    _, results = runs
    slow = results[2 + len(FAULTS)]
    assert all(r["ok"] and r["mismatches"] == [] for r in slow), [r.get("error") for r in slow]
    assert all(r["seconds"] > 1.2 * TIMEOUT for r in slow)
    assert served(slow[0]["stats"], 1, ("get",))[LAST] == (results[0][0]["file_sizes"][LAST])


def test_offline_rerun_makes_no_request(runs, hub, source, tmp_path):
    homes, _ = runs
    (offline,) = two_nodes(hub, source, homes, tmp_path, [REPO], offline=True)
    assert all(r["ok"] and r["checked"] > 0 and r["mismatches"] == [] for r in offline), \
        [r.get("error") for r in offline]
    assert offline[0]["stats"]["log"] == []


def test_cli_with_a_hub_id_and_revision(hub, source, tmp_path):
    """The mission's command on one node: `torchrun --nproc_per_node=2 -m distload.load --model ORG/NAME`."""
    env = client_env(hub.url("cli"), tmp_path / "node")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distload.load",
           "--device", "cpu", "--model", REPO, "--revision", "v1", "--max-new-tokens", "0",
           "--cache-dir", str(tmp_path / "dl"), "--report", str(tmp_path / "report.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    snapshots = tmp_path / "node" / "hf" / "hub" / "models--acme--tiny" / "snapshots"
    (sha,) = os.listdir(snapshots)                       # huggingface_hub's cache (HF_HOME), not --cache-dir
    assert sorted(os.listdir(snapshots / sha)) == sorted([*shards, "config.json", "model.safetensors.index.json",
                                                         "tokenizer.json"])
    assert sorted(os.listdir(tmp_path / "dl" / "hub" / "models--acme--tiny" / sha / "headers")) == shards
    assert [r["host"] for r in report["ranks"]] == [socket.gethostname()] * 2
    assert report["ranks"][0]["fetched_bytes"] > 0 and report["ranks"][1]["fetched_bytes"] == 0
    assert " host " in proc.stderr and "downloaded" in proc.stderr and f"{REPO}@{sha}" in proc.stderr
