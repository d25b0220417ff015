"""Smoke tests of the benchmarks on tiny models. scripts/bench_load.py: one repeat of
every system; the table, the ratios and the three figures are all there (their values are
not judged here, except bytes read, which are exact whatever the machine's speed).
scripts/bench_pipeline.py: every figure is printed and written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.multiprocess

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_load.py"
SYSTEMS = ("distload", "dcp", "accelerate", "raw")


def test_bench_load_smoke(tiny_ckpt, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), str(tiny_ckpt), "--nproc", "2", "--repeats", "1",
           "--memory-runs", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    text = proc.stdout
    for system in SYSTEMS:
        assert f"\n{system} " in text, f"no table row for {system}"
    for peer in SYSTEMS[1:]:
        assert f"distload / {peer}" in text
    for name in "abc":
        assert f"figure ({name}): PASS" in text or f"figure ({name}): FAIL" in text

    report = json.loads(out.read_text())
    assert report["errors"] == {}
    warm = report["summary"]["warm"]
    assert set(warm) == set(SYSTEMS)
    for system, s in warm.items():
        assert [r["rank"] for r in s["ranks"]] == [0, 1]
        for r in s["ranks"]:
            assert r["seconds"] > 0 and r["materialized"] > 0, (system, r)
    ckpt_bytes = report["checkpoint_tensor_bytes"]
    assert warm["distload"]["job"]["bytes_read"] == ckpt_bytes           # its own counter
    assert warm["raw"]["job"]["bytes_read"] >= ckpt_bytes                # rchar: at least the tensors
    assert warm["accelerate"]["job"]["materialized"] == 2 * ckpt_bytes   # every rank, whole model
    assert warm["dcp"]["job"]["materialized"] == ckpt_bytes
    ratios = report["ratios"]["warm"]
    assert set(ratios) == {"dcp", "accelerate", "raw"}
    for r in ratios.values():
        assert set(r) >= {"time", "bytes", "memory"} and r["time"] > 0 and r["bytes"] > 0
    figures = {f["name"]: f["pass"] for f in report["figures"]}
    assert set(figures) == {"a", "b", "c"}
    assert figures["a"], "distload read other than exactly its tensors"


def test_bench_pipeline_smoke(tmp_path):
    """scripts/bench_pipeline.py on a tiny model: every figure is printed and written."""
    script = SCRIPT.parent / "bench_pipeline.py"
    out = tmp_path / "pipe.json"
    cmd = [sys.executable, str(script), "--hidden", "64", "--layers", "2", "--heads", "4",
           "--kv-heads", "2", "--vocab", "128", "--batch", "4", "--seq", "8",
           "--micro-batches", "2", "4", "--stream-batches", "3", "--decode-batch", "4",
           "--prompt", "4", "--new-tokens", "8", "--repeats", "1", "--max-tries", "2",
           "--cache", str(tmp_path / "cache"), "--json", str(out), "--trace-overhead",
           "--check", "--floor", "all=0",  # a tiny model's ratios are not the point: the lines are
           "--stages", str(tmp_path / "traces")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for kind in ("forward x 2", "forward x 4", "stream x 2", "stream x 4", "prefill", "generate"):
        assert f"check {kind:<12} " in proc.stdout
    assert "check: every ratio at or above its floor" in proc.stdout
    assert proc.stdout.count("forward  batch 4 x 8") == 2
    assert proc.stdout.count("stream   3 batches of 4 x 8") == 2
    assert "decode   batch 4" in proc.stdout
    figures = json.loads(out.read_text())["figures"]
    for kind in ("forward_ratio", "stream_ratio"):
        assert set(figures[kind]) == {"2", "4"} and all(v > 0 for v in figures[kind].values())
    assert all(figures[f"{kind}_ratio"] > 0 for kind in ("prefill", "generate"))
    # 7 decode steps of a tiny model can drown in a loaded machine's noise: the bench
    # must then say so, never print a negative or infinite figure
    if figures["decode_ratio"] is None:
        assert "decode   batch 4, 8 new tokens: not measurable" in proc.stdout
    else:
        assert figures["decode_ratio"] > 0 and "decode   batch 4, 8 new tokens: sequential" in proc.stdout
    assert "prefill  batch 4 x 4" in proc.stdout and "generate end to end" in proc.stdout
    assert "with tracing on, tokens/s relative to off (pipeline, same run): forward " in proc.stdout
    for key in ("forward_2", "forward_4", "stream_2", "stream_4", "generate_8"):
        assert f"stages   {key:<12} one traced call of " in proc.stdout
        trace = json.loads((tmp_path / "traces" / f"{key}.json").read_text())
        assert {e["pid"] for e in trace["traceEvents"] if e.get("ph") == "X"} == {0, 1}
    assert proc.stdout.count("the schedule reached") == 4
    # --stages also times one process cut as the pipeline cuts
    assert "pieces   one process cut as the pipeline cuts" in proc.stdout
    assert "the pipeline against that process: forward x 2 " in proc.stdout
    assert set(figures["pieces_ratio"]) == {"forward_2", "forward_4", "stream_2", "stream_4",
                                            "decode", "prefill", "generate"}
    assert all(figures["pieces_speed"][k] > 0 for k in ("forward_2", "stream_4", "generate"))


def test_bench_observe_smoke(tiny_ckpt, tmp_path):
    """scripts/bench_observe.py: one load per mode, every figure printed and written."""
    out = tmp_path / "observe.json"
    cmd = [sys.executable, str(SCRIPT.parent / "bench_observe.py"), str(tiny_ckpt), "--repeats", "1",
           "--warmup", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for mode in ("off", "progress", "progress+trace"):
        assert f"\n{mode} " in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["runs"]["progress+trace"][0]["events"] > 0
    assert figures["steps"]["span_off_ns"] > 0 and "per step: trace.span off" in proc.stdout


def test_bench_plan_seed_smoke(tmp_path):
    """scripts/bench_plan.py's seed figures (meta models only): bytes per tier per device for
    distload and accelerate; distload's map never offloads between GPUs."""
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_plan.py"), "--only", "seed", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "slowest stage accelerate / distload" in proc.stdout and "shared" in proc.stdout
    rows = json.loads(out.read_text())["seed_70b"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        ours = r["distload"]
        assert not ours["offloaded_between_gpus"] and ours["bytes"]["cpu"] <= 100 * 10**9
        assert max(ours["bytes"]["0"], ours["bytes"]["1"]) <= 20 * 10**9
        assert sum(ours["bytes"].values()) == sum(r["accelerate"]["bytes"].values())


def test_bench_load_staged_smoke(tiny_ckpt, tmp_path):
    """--staged: the staged path forced on the CPU against raw reads, warm and cold, in one
    torchrun; every configuration has a row and a ratio, the staged read is bit-exact."""
    out = tmp_path / "staged.json"
    cmd = [sys.executable, str(SCRIPT), str(tiny_ckpt), "--staged", "--nproc", "2", "--repeats", "1",
           "--cold", "--threads", "1,3", "--staging-size", "64KiB", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "== warm: 2 rank(s)" in proc.stdout and "== cold: 2 rank(s)" in proc.stdout
    assert "bit-exact against safetensors on every rank: yes" in proc.stdout
    report = json.loads(out.read_text())
    for mode in ("warm", "cold"):
        configs = report["summary"][mode]
        assert {(c["system"], c["threads"], c["direct"]) for c in configs.values()} == {
            ("raw", 1, False), ("raw_dest", 1, False), ("copy", 1, False), ("staged", 1, False), ("staged", 1, True),
            ("staged", 3, False), ("staged", 3, True)}
        for c in configs.values():
            assert c["median"]["gbps"] > 0 and c["median"]["x_raw"] > 0
            assert len(c["median"]["rank_gbps"]) == 2
            if c["system"] == "staged":   # bounded: threads x one CPU buffer of 64 KiB
                assert 0 < c["staging_bytes"] <= c["threads"] * (64 << 10)
        assert any(line.startswith(f"goal {mode}:") for line in report["goals"])
    assert max(c for c in report["summary"]["cold"]["raw|1|False"]["resident_after_evict"]) < 0.05
