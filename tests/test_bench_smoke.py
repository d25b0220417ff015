"""Smoke test of scripts/bench_load.py: one repeat of every system on a tiny checkpoint;
the table, the ratios and the three figures are all there (their values are not judged
here, except bytes read, which are exact whatever the machine's speed)."""

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
