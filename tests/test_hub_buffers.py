"""A hub checkpoint whose shard holds only keys that are buffers of the caller's model
(DeepSeek-V3's router correction biases: parameters of distload's own model, persistent
buffers of transformers') is fetched and loaded, through both loading paths: the
pipeline (`distload.load`) and accelerate's workflow (`load_checkpoint_and_dispatch` with a
hub id). Reference: transformers' `from_pretrained` of the same files — every buffer,
every parameter, the logits. The hub is tests/fakehub.py behind the real
huggingface_hub client (a subprocess: the client reads HF_ENDPOINT at import)."""

from __future__ import annotations

import pytest
import torch

from .archs import save_in_memory_layout
from .archs_frontier import hf_config, hf_model
from .fakehub import run_client

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 9, 20, 3, 7], [4, 4, 8, 15, 16, 23]])
BUFFERS = "model-buffers.safetensors"

_CLIENT = """
import glob, os, sys, torch
import distload
from transformers import AutoConfig, AutoModelForCausalLM
from distload import init_empty_weights, load_checkpoint_and_dispatch

repo, local, out, ids = sys.argv[1], sys.argv[2], sys.argv[3], torch.tensor(eval(sys.argv[4]))
# accelerate's workflow first, on an empty hub cache: what is fetched then is its own doing
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local), experts_implementation="eager")
model = load_checkpoint_and_dispatch(model, repo, device_map={"": "cpu"})
with torch.no_grad():
    logits = model(ids).logits
snapshot = os.path.join(os.environ["HF_HOME"], "hub", "models--" + repo.replace("/", "--"), "snapshots", "*", "*")
fetched = sorted(os.path.basename(p) for p in glob.glob(snapshot))
pipe = distload.load(repo, device="cpu")
with torch.no_grad():
    pipe_logits = pipe.forward(ids)
torch.save({"pipe_logits": pipe_logits, "pipe_files": list(pipe.plan.stage(0).files), "fetched": fetched,
            "pipe_params": {n: p.detach().clone() for n, p in pipe.module.named_parameters()},
            "state": {k: v.clone() for k, v in model.state_dict().items()}, "logits": logits}, out)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """DeepSeek-V3 in transformers' own layout (its state dict: packed experts, which a
    model built from the config holds), sharded so: every correction bias (non-zero) in a
    shard of its own, the rest in another."""
    model = hf_model(hf_config("deepseek_v3"))
    biases = {k: v for k, v in model.state_dict().items() if k.endswith("e_score_correction_bias")}
    assert biases and all(v.abs().sum() > 0 for v in biases.values())   # not their init value (zeros)
    return save_in_memory_layout(model, tmp_path_factory.mktemp("hub_buffers") / "dsv3",
                                 lambda key: BUFFERS if key in biases else "model-weights.safetensors")


def test_a_shard_of_buffers_only_is_fetched_and_loaded(checkpoint, tmp_path):
    run = run_client(_CLIENT, ["acme/dsv3", str(checkpoint), str(tmp_path / "out.pt"), str(IDS.tolist())],
                     "acme/dsv3", checkpoint, tmp_path / "home")
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                            experts_implementation="eager").eval()
    with torch.no_grad():
        want_logits = ref(IDS).logits
    want = ref.state_dict()
    buffers = {n for n, _ in ref.named_buffers() if n in want}
    assert buffers and all(n.endswith("e_score_correction_bias") for n in buffers)

    # accelerate's workflow: the buffers' shard fetched, every buffer and parameter as
    # transformers loads them
    assert BUFFERS in got["fetched"]
    assert got["state"].keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got["state"][name], value), name
    torch.testing.assert_close(got["logits"], want_logits, rtol=0, atol=1e-5)

    # the pipeline: the biases are parameters there, read from the same shard
    assert BUFFERS in got["pipe_files"]
    for name in buffers:
        assert torch.equal(got["pipe_params"][name], want[name]), name
    assert (got["pipe_logits"] - want_logits).abs().max() <= 1e-4
