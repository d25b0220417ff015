"""The figures README calls current are current after the calls, in ``--report`` (rank 0's
`pipe.job_report`) and on stderr: checked against the trace of the same run."""

from __future__ import annotations

import json
import re

import pytest

from .mp import torchrun, worker

pytestmark = pytest.mark.multiprocess


def test_offload_waits_in_the_report_match_the_trace(tiny_ckpt, tmp_path):
    trace_path, report_path = tmp_path / "t.json", tmp_path / "r.json"
    proc = torchrun(2, [worker("cli_disk_tier.py"), "--device", "cpu", "--model", str(tiny_ckpt),
                        "--offload-dir", str(tmp_path / "off"), "--trace", str(trace_path),
                        "--report", str(report_path), "--input-ids", "1,2,3", "--input-ids", "4,5",
                        "--max-new-tokens", "5"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = json.loads(trace_path.read_text())["traceEvents"]
    report = json.loads(report_path.read_text())
    shown = re.findall(r"rank (\d) (\d+\.\d{3}) s", next(
        line for line in proc.stderr.splitlines() if "waited for offloaded weights:" in line))
    for row in report["ranks"]:
        spans = [e for e in events if e["name"] == "offload wait" and e["pid"] == row["rank"]]
        assert spans, f"rank {row['rank']} recorded no offload wait"
        traced = sum(e["dur"] for e in spans) / 1e6
        # the report's figure times the same waits, a few calls around each span included
        assert traced <= row["offload_wait_seconds"] <= traced * 1.1 + 0.005, (row, traced)
        assert (str(row["rank"]), f"{row['offload_wait_seconds']:.3f}") in shown
    # the line comes after the generation, not with the load's table
    lines = proc.stderr.splitlines()
    assert min(i for i, line in enumerate(lines) if "generated " in line) < \
        min(i for i, line in enumerate(lines) if "waited for offloaded weights" in line)
