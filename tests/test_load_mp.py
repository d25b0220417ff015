"""Multi-process loading under torchrun (gloo on CPU): every rank's tensors equal what
safetensors' own reader returns, and each rank reads only its own bytes."""

import json

import pytest
import torch
from safetensors import safe_open

from distload.checkpoint import index_checkpoint

from .mp import torchrun, worker

pytestmark = pytest.mark.multiprocess


def _run(ckpt, nproc, tmp_path, dtype="none"):
    proc = torchrun(nproc, [worker("load_and_check.py"), str(ckpt), str(tmp_path), dtype])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("nproc", [2, 3])
def test_each_rank_loads_its_stage_bit_exact(tiny_ckpt, tmp_path, nproc):
    results = _run(tiny_ckpt, nproc, tmp_path)
    index = index_checkpoint(tiny_ckpt)
    assert len({r["digest"] for r in results}) == 1                     # one plan everywhere
    for r in results:
        assert r["mismatches"] == [] and r["checked"] > 0
        assert r["meta_left"] == []
        report = r["report"]
        assert report["bytes_read"] == report["tensor_bytes"]            # exactly its own ranges
    assert sum(r["report"]["bytes_read"] for r in results) == index.tensor_bytes
    modules = [m for r in results for m in r["report"]["modules"]]
    assert len(modules) == len(set(modules))


def test_dtype_cast_matches_torch_cast(tiny_ckpt, tmp_path):
    results = _run(tiny_ckpt, 2, tmp_path, dtype="float32")
    assert all(r["mismatches"] == [] and r["checked"] > 0 for r in results)
    # bytes read are the checkpoint's (bf16) bytes, not the cast size
    assert sum(r["report"]["bytes_read"] for r in results) == index_checkpoint(tiny_ckpt).tensor_bytes


def test_tied_embeddings_across_ranks_read_once(tiny_tied_ckpt, tmp_path):
    results = _run(tiny_tied_ckpt, 2, tmp_path)
    assert all(r["mismatches"] == [] for r in results)
    last = results[-1]["report"]
    assert "lm_head" in last["modules"] and "model.embed_tokens" not in last["modules"]
    assert sum(r["report"]["bytes_read"] for r in results) == index_checkpoint(tiny_tied_ckpt).tensor_bytes


def test_single_process_load_equals_safetensors(tiny_tied_ckpt):
    import distload

    pipe = distload.load(str(tiny_tied_ckpt), device="cpu")
    head = pipe.module.lm_head.weight
    assert head is pipe.module.model.embed_tokens.weight           # still tied after loading
    with safe_open(str(tiny_tied_ckpt / "model-00001-of-00004.safetensors"), "pt") as f:
        for name in f.keys():
            assert torch.equal(pipe.module.get_parameter(name), f.get_tensor(name))
    assert pipe.report["bytes_read"] == index_checkpoint(tiny_tied_ckpt).tensor_bytes


def test_bin_checkpoint_loads_without_unpickling_objects(tiny_ckpt, tmp_path):
    """A `pytorch_model.bin` checkpoint (zip format) loads through torch.load(mmap=True,
    weights_only=True) and equals what torch.load itself returns."""
    import shutil

    import distload
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(tiny_ckpt.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(tiny_ckpt / "config.json", bin_dir / "config.json")
    torch.save(state, bin_dir / "pytorch_model.bin")

    pipe = distload.load(str(bin_dir), device="cpu")
    reference = torch.load(bin_dir / "pytorch_model.bin", weights_only=True)
    assert pipe.plan.format == "bin"
    for name, tensor in reference.items():
        assert torch.equal(pipe.module.get_parameter(name), tensor), name
