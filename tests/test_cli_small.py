"""Small things a new user met: a path that exists but cannot be reached, the table's cut
module names, --help's one default for --max-batch-size."""

from __future__ import annotations

import os

import pytest

from distload.cli.config import _parser
from distload.cli.table import format_table
from distload.errors import CheckpointError
from distload.sources import open_source


def test_a_path_this_user_cannot_reach_is_not_called_missing(tmp_path, monkeypatch):
    target = str(tmp_path / "locked" / "model")
    real_stat = os.stat

    def stat(path, *args, **kwargs):   # as for a directory without search permission (root ignores modes)
        if str(path).startswith(str(tmp_path / "locked")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(CheckpointError, match=r"^permission denied: .*locked/model \(it exists, but this user"):
        open_source(target)
    with pytest.raises(CheckpointError, match=r"^no such file or directory: .*missing \(nor a hub id"):
        open_source(str(tmp_path / "missing"))


def test_the_table_marks_a_cut_module_list():
    row = {"rank": 0, "host": "vm", "device": "cpu", "tensors": 3, "tensor_bytes": 10, "bytes_read": 10,
           "load_seconds": 0.1, "peak_rss_bytes": 1 << 20,
           "modules": ["model.embed_tokens", *(f"model.layers.{i}" for i in range(0, 40, 2)), "model.norm",
                       "lm_head"]}
    table = format_table({"world_size": 1, "checkpoint_bytes": 10, "ranks": [row]})
    line = table.splitlines()[2]
    assert "embed_tokens, layers.0, layers.2,…" in line    # 34 characters, the last the mark
    assert format_table({"world_size": 1, "checkpoint_bytes": 10,
                         "ranks": [{**row, "modules": ["model.layers.0", "model.norm", "lm_head"]}]}
                        ).splitlines()[2].count("layers.0, norm, lm_head ") == 1


def test_help_gives_one_default_for_max_batch_size():
    text = " ".join(_parser().format_help().split())
    assert "(default: room for 1, all prompts in one batch)" in text


def test_a_read_only_offload_directory_is_not_called_uncreatable(tmp_path, monkeypatch):
    from pathlib import Path

    from distload.offload import OffloadError, OffloadStore

    root = tmp_path / "off"
    root.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):   # as in a directory without write permission (root ignores modes)
        if self.parent == root:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OffloadError, match=r"^cannot write into the offload directory .*off: Permission denied"):
        OffloadStore(root)
    with pytest.raises(OffloadError, match=r"^cannot create the offload directory .*new: Permission denied"):
        OffloadStore(root / "new")


@pytest.mark.multiprocess
def test_a_job_wide_error_is_reported_by_rank_0_alone(tmp_path):
    from .mp import Ranks, worker

    job = Ranks([[worker("cli_slowed.py"), "--device", "cpu", "--model", str(tmp_path / "typo")]] * 2, tmp_path)
    assert job.wait(60) == [1, 1]
    assert job.stderr(0).strip().splitlines()[-1] == (
        f"[rank 0] ERROR CheckpointError: no such file or directory: {tmp_path / 'typo'} (nor a hub id like org/name)")
    assert "ERROR" not in job.stderr(1) and "Traceback" not in job.stderr(1)
