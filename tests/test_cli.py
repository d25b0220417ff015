"""End to end: the CLI under torchrun, its report, and failures that stop every rank."""

import json
import shutil
import struct
import time

import pytest

from distload.checkpoint import index_checkpoint

from .mp import torchrun, worker

pytestmark = pytest.mark.multiprocess


def _cli(nproc, *args, timeout=180, env=None):
    return torchrun(nproc, ["distload.load", "--device", "cpu", *args], module=True, timeout=timeout, env=env)


def test_demo_run_with_report(tmp_path):
    report_path = tmp_path / "out.json"
    proc = _cli(2, "--max-new-tokens", "0", "--cache-dir", str(tmp_path / "cache"), "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    demo = next(p for p in (tmp_path / "cache").glob("demo-*") if p.is_dir())
    assert len(list(demo.glob("*.safetensors"))) >= 3 and (demo / "model.safetensors.index.json").exists()
    assert report["world_size"] == 2
    assert report["checkpoint_bytes"] == index_checkpoint(demo).tensor_bytes
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert set(r) >= {"rank", "device", "modules", "tensors", "tensor_bytes", "bytes_read",
                          "load_seconds", "peak_rss_bytes", "offloaded_bytes"}
        assert r["bytes_read"] == r["tensor_bytes"] > 0 and r["load_seconds"] > 0
    assert sum(r["bytes_read"] for r in ranks) == report["checkpoint_bytes"]
    assert "GB/s" in proc.stderr and "read" in proc.stderr           # rank 0's table


def test_sharded_checkpoint_with_dtype(tiny_ckpt, tmp_path):
    report_path = tmp_path / "r.json"
    proc = _cli(3, "--model", str(tiny_ckpt), "--dtype", "float32", "--max-new-tokens", "0",
                "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["world_size"] == 3
    assert sum(r["bytes_read"] for r in report["ranks"]) == index_checkpoint(tiny_ckpt).tensor_bytes


def _corrupt_header(path):
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))   # header length far past the end of the file


def test_corrupt_shard_stops_every_rank_naming_the_file(tiny_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    _corrupt_header(shard)
    start = time.monotonic()
    proc = _cli(2, "--model", str(broken), "--max-new-tokens", "0", timeout=90)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert proc.stderr.count(shard.name) >= 2                         # every rank says which file
    assert "CheckpointError" in proc.stderr


def test_rank_that_fails_while_reading_stops_every_rank(tiny_ckpt):
    start = time.monotonic()
    proc = torchrun(2, [worker("fail_on_rank.py"), str(tiny_ckpt), "1"], timeout=90)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert "injected read failure in model-0000" in proc.stderr
    assert "rank 1 failed" in proc.stderr                             # what rank 0 raised


def test_missing_model_path_is_a_clear_error(tmp_path):
    proc = _cli(1, "--model", str(tmp_path / "nope"), "--max-new-tokens", "0", timeout=60)
    assert proc.returncode != 0 and "no such file or directory" in proc.stderr
