"""The Python API plans for what it runs: by default the reserve is `generate`'s (the
head's logits for the last position only), full-sequence logits only for a declared
``workload``; its messages name its keywords, the CLI's the flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

import distload
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config

VOCAB = 32000


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """A vocabulary much wider than the model: the head's logits dominate any reserve."""
    out = tmp_path_factory.mktemp("wide") / "wide"
    make_checkpoint(tiny_config(vocab_size=VOCAB, num_hidden_layers=2), out, num_shards=1, dtype="float32", seed=3)
    return out


def test_default_reserve_is_generates_last_position_logits(wide_vocab):
    default = distload.plan_job(str(wide_vocab), device="cpu")
    generate = distload.plan_job(str(wide_vocab), device="cpu", workload="generate")
    forward = distload.plan_job(str(wide_vocab), device="cpu", workload="forward", max_batch_size=2)
    assert default.run_shape == generate.run_shape == {"max_batch_size": 1, "max_seq_len": 256,
                                                      "workload": "generate"}
    assert default.stages[0].reserve == generate.stages[0].reserve
    # full-sequence logits (float32: 4 B for the output, 4 B for the upcast copy) of the
    # declared batch: 2 sequences of 256 positions, not one row per sequence
    full_logits = 2 * 256 * VOCAB * (4 + 4)
    assert forward.stages[0].reserve["work"] >= full_logits > 50 * default.stages[0].reserve["work"]


def test_plan_errors_name_the_api_keywords_and_the_cli_flags(tiny_ckpt):
    budget = {0: "100KB", "cpu": 0}
    with pytest.raises(distload.PlanError, match=r"raise max_memory=, or lower max_batch_size= / max_seq_len="):
        distload.plan_job(str(tiny_ckpt), device="cpu", max_memory=budget)
    proc = subprocess.run([sys.executable, "-m", "distload.load", "--model", str(tiny_ckpt), "--device", "cpu",
                           "--max-memory", "0=100KB,cpu=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "raise --max-memory, or lower --max-batch-size / --max-seq-len" in last, last
