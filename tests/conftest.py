"""Shared fixtures: small Llama-family checkpoints in the real Hugging Face layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Subprocesses (torchrun ranks, workers, CLI runs) import this checkout's distload, not
# whichever checkout pip last installed in editable mode.
_REPO = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH")) if p)

from distload.sources.demo import make_checkpoint

TINY = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


def tiny_config(**overrides) -> dict:
    return {**TINY, **overrides}


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """4 layers, untied, bfloat16, 3 shards."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint(tiny_config(torch_dtype="bfloat16"), out, num_shards=3, dtype="bfloat16", seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_tied_ckpt(tmp_path_factory):
    """5 layers, tied embeddings, float32, 4 shards."""
    out = tmp_path_factory.mktemp("ckpt") / "tied"
    make_checkpoint(tiny_config(num_hidden_layers=5, tie_word_embeddings=True), out, num_shards=4,
                    dtype="float32", seed=2)
    return out
