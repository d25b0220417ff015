"""README's runnable blocks run as written: every fenced ``python`` or ``bash`` block
after a ``<!-- runnable -->`` line (``<!-- runnable: torchrun N -->``: a python block run
as a file under ``torchrun --nproc_per_node=N``), on the demo model, in the repository's
root. A block that needs a placeholder filled would say so in its marker; none does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
MARKED = re.compile(r"^<!-- runnable(?:: torchrun (\d+))? -->\n```(python|bash)\n(.*?)^```$", re.M | re.S)


def _blocks() -> list[tuple[int, str, str, int | None]]:
    text = (ROOT / "README.md").read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2), m.group(3), int(m.group(1)) if m.group(1) else None)
            for m in MARKED.finditer(text)]


def test_readme_marks_its_examples_runnable():
    kinds = [(kind, nproc) for _, kind, _, nproc in _blocks()]
    assert ("python", 2) in kinds and ("python", None) in kinds and ("bash", None) in kinds, kinds
    # every marker is followed by a block it can run
    assert (ROOT / "README.md").read_text().count("<!-- runnable") == len(kinds)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One distload cache for every block: the demo checkpoint is made once."""
    cache = tmp_path_factory.mktemp("readme-cache")
    return {**os.environ, "DISTLOAD_CACHE": str(cache), "OMP_NUM_THREADS": "1", "DISTLOAD_PROGRESS": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("line, kind, code, nproc", _blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_block_runs(tmp_path, env, line, kind, code, nproc):
    script = tmp_path / ("example.py" if kind == "python" else "example.sh")
    script.write_text(code)
    if kind == "bash":
        cmd = ["bash", "-euo", "pipefail", str(script)]
    elif nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"README line {line}:\n{out[-4000:]}"
    assert "Traceback" not in out and "terminate called" not in out, out[-4000:]
    if kind == "bash" and "-m distload.load" in code:   # the demo says where it is and what it runs
        assert "demo checkpoint: " in proc.stderr and "demo prompts (token ids): " in proc.stderr, proc.stderr
