"""Streamed execution of offloaded weights: with half of each rank's layers on the disk
(or CPU) tier, forward and generate give what the same model gives with nothing offloaded
and what transformers gives; the prefetcher keeps at most `max_resident` units; peak
memory stays within the resident stage plus that window; reports carry the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import distload
import distload.cli.table
from distload.sources.demo import make_checkpoint
from distload.offload import OffloadStore, attach_streaming, ensure_entries, streamer_of
from distload.plan.types import Tier

from .conftest import tiny_config
from .mp import torchrun, worker
from .workers.offload_common import half_on_disk

transformers = pytest.importorskip("transformers")
ATOL = 1e-4
IDS = torch.tensor([[3, 17, 42, 9, 100, 7, 55, 21], [0, 0, 0, 5, 6, 7, 8, 9]])
MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "ckpt"
    return make_checkpoint(tiny_config(num_hidden_layers=4), out, num_shards=3, dtype="float32", seed=4)


@pytest.fixture(scope="module")
def reference(ckpt):
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _load(ckpt, monkeypatch, offload_dir, tier=Tier.DISK, **kw):
    import distload.loader.api as api

    plan_load = api.plan_load
    with monkeypatch.context() as m:
        if tier is not None:
            m.setattr(api, "plan_load", lambda *a: half_on_disk(plan_load(*a), tier))
        return distload.load(str(ckpt), device="cpu", offload_dir=str(offload_dir), **kw)


def _hf_logits(reference, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return reference(ids, attention_mask=mask, position_ids=pos).logits


@torch.no_grad()
def test_forward_and_generate_equal_resident_and_transformers(ckpt, reference, tmp_path, monkeypatch):
    pipe = _load(ckpt, monkeypatch, tmp_path / "off")
    plain = _load(ckpt, monkeypatch, tmp_path / "off", tier=None)
    streamer = streamer_of(pipe.module)
    assert streamer.unit_names == ["model.layers.2", "model.layers.3"]
    assert all(p.is_meta for p in pipe.module.model.layers["3"].parameters())   # between uses
    logits = pipe.forward(IDS, MASK)
    assert torch.equal(logits, plain.forward(IDS, MASK))                        # bit-exact
    real = MASK.bool()
    torch.testing.assert_close(logits[real], _hf_logits(reference, IDS, MASK)[real], atol=ATOL, rtol=0)
    tokens = pipe.generate(IDS, MASK, max_new_tokens=6)
    assert torch.equal(tokens, plain.generate(IDS, MASK, max_new_tokens=6))
    hf = reference.generate(IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    assert torch.equal(tokens, hf)
    assert all(p.is_meta for p in pipe.module.model.layers["2"].parameters())
    assert streamer.stats.fetches >= 2 * 7 and streamer.stats.prefetched > 0
    assert streamer.stats.peak_resident <= 2


@torch.no_grad()
def test_report_second_load_writes_nothing_and_wait_is_live(ckpt, tmp_path, monkeypatch):
    first = _load(ckpt, monkeypatch, tmp_path / "off", dtype="bfloat16")   # a cast: copies
    layer_bytes = first.plan.unit_bytes["model.layers.2"] + first.plan.unit_bytes["model.layers.3"]
    assert first.report["offloaded_bytes_by_tier"] == {"cpu": 0, "disk": layer_bytes}
    assert first.report["offloaded_bytes"] == layer_bytes
    assert first.report["offload_bytes_written"] >= layer_bytes
    second = _load(ckpt, monkeypatch, tmp_path / "off", dtype="bfloat16")
    assert second.report["offload_bytes_written"] == 0
    assert second.report["offload_wait_seconds"] == 0.0
    second.forward(IDS)
    assert second.report["offload_wait_seconds"] > 0.0           # updated as forwards run
    plain = _load(ckpt, monkeypatch, tmp_path / "off", tier=None, dtype="bfloat16")
    assert torch.equal(second.forward(IDS), plain.forward(IDS))
    assert "offloaded_bytes_by_tier" in plain.report and plain.report["offloaded_bytes"] == 0
    table = distload.cli.table.format_table(second.job_report)
    assert "rank 0 offloaded: cpu 0.0 MB, disk" in table and "wrote 0.0 MB" in table


@torch.no_grad()
def test_planner_budgets_put_units_on_disk_and_they_stream(ckpt, tmp_path, monkeypatch):
    """No hand-made tiers: a device budget of about half the model, no CPU tier."""
    plain = _load(ckpt, monkeypatch, tmp_path / "off", tier=None)
    shape = {"max_batch_size": 2, "max_seq_len": 16}
    reserved = distload.plan_job(str(ckpt), device="cpu", **shape).stage(0).reserved_bytes
    half = sum(plain.plan.unit_bytes.values()) // 2
    pipe = distload.load(str(ckpt), device="cpu", offload_dir=str(tmp_path / "off"),
                         max_memory={0: half + reserved, "cpu": 0}, **shape)
    tiers = dict(zip(pipe.plan.stage(0).units, pipe.plan.stage(0).unit_tiers))
    assert Tier.DISK in tiers.values() and pipe.report["offloaded_bytes_by_tier"]["disk"] > 0
    assert streamer_of(pipe.module).unit_names == [u for u, t in tiers.items() if t == Tier.DISK]
    slots = pipe.plan.stage(0).stream_slots                       # the executor follows the plan
    assert streamer_of(pipe.module).max_resident == slots and streamer_of(pipe.module).prefetch == (slots == 2)
    assert torch.equal(pipe.forward(IDS, MASK), plain.forward(IDS, MASK))
    assert torch.equal(pipe.generate(IDS, MASK, max_new_tokens=4), plain.generate(IDS, MASK, max_new_tokens=4))


@torch.no_grad()
def test_cpu_tier_on_a_cpu_rank_stays_resident(ckpt, tmp_path, monkeypatch):
    pipe = _load(ckpt, monkeypatch, tmp_path / "off", tier=Tier.CPU)
    assert streamer_of(pipe.module) is None and not (tmp_path / "off").exists()
    assert pipe.report["offloaded_bytes_by_tier"]["cpu"] > 0
    assert not any(p.is_meta for p in pipe.module.parameters())


class _Block(nn.Module):
    def __init__(self, width: int, scale: float | None = None):
        super().__init__()
        self.lin = nn.Linear(width, width)
        if scale is not None:
            self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x):
        y = torch.relu(self.lin(x))
        return y * self.scale if hasattr(self, "scale") else y


def _sequential(n=4, width=32):
    """Four blocks; block 1 has a persistent buffer; blocks 2 and 3 share a weight."""
    torch.manual_seed(0)
    model = nn.Sequential(*[_Block(width, 2.0 if i == 1 else None) for i in range(n)])
    model[3].lin.weight = model[2].lin.weight
    return model.eval()


def _sources(model: nn.Module, tmp_path, pin: bool = False) -> dict:
    """Unit "1" from CPU tensors (the cpu tier; pinned for CUDA), units "2" and "3" from
    offload-store entries (the disk tier), the tied weight as one entry in two slots."""
    from safetensors.torch import save_file

    from distload.checkpoint import index_checkpoint

    state = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    source = {n: (t.pin_memory() if pin else t) for n, t in state.items() if n.startswith("1.")}
    save_file({n: t for n, t in state.items() if n[0] in "23" and n != "3.lin.weight"},
              str(tmp_path / "w.safetensors"))
    metas = index_checkpoint(str(tmp_path / "w.safetensors")).tensors
    entries, _ = ensure_entries(OffloadStore(tmp_path / "off"), metas, checkpoint=str(tmp_path))
    return {**source, **entries, "3.lin.weight": entries["2.lin.weight"]}


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("max_resident", [1, 2, 3])
@torch.no_grad()
def test_attach_streaming_on_a_plain_module(tmp_path, prefetch, max_resident):
    model = _sequential()
    x = torch.randn(5, 32)
    expected = model(x)
    source = _sources(model, tmp_path)
    streamer = attach_streaming(model, ["1", "2", "3"], source, "cpu", prefetch=prefetch,
                                max_resident=max_resident)
    assert model[2].lin.weight.is_meta and model[1].scale.is_meta
    for _ in range(3):
        assert torch.equal(model(x), expected)
    assert model[3].lin.weight.is_meta and model[0].lin.weight.device.type == "cpu"
    assert streamer.stats.peak_resident <= max_resident
    assert streamer.stats.fetches >= 9
    assert (streamer.stats.prefetched > 0) == (prefetch and max_resident > 1)
    streamer.close()
    assert model[1].lin.weight.is_meta and not model[1]._forward_pre_hooks


def test_attach_streaming_rejects_bad_input():
    model = _sequential()
    w = {"1.lin.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match="not a submodule"):
        attach_streaming(model, ["9"], w, "cpu")
    with pytest.raises(ValueError, match="disjoint"):
        attach_streaming(model, ["1", "1.lin"], w, "cpu")
    with pytest.raises(ValueError, match="under no unit"):
        attach_streaming(model, ["1"], {**w, "2.lin.bias": torch.zeros(32)}, "cpu")
    with pytest.raises(ValueError, match="no tensors"):
        attach_streaming(model, ["1", "2"], w, "cpu")
    with pytest.raises(ValueError, match="shape"):
        attach_streaming(model, ["1"], {"1.lin.weight": torch.zeros(3)}, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_side_stream_prefetch_from_pinned_memory_and_disk(tmp_path):
    model = _sequential().cuda()
    x = torch.randn(5, 32, device="cuda")
    expected = model(x)
    streamer = attach_streaming(model, ["1", "2", "3"], _sources(model, tmp_path, pin=True), "cuda",
                                max_resident=2)
    assert model[2].lin.weight.is_meta
    for _ in range(3):
        assert torch.equal(model(x), expected)
    assert streamer.stats.prefetched > 0 and streamer.stats.peak_resident <= 2
    assert model[1].scale.is_meta and model[0].lin.weight.is_cuda


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["half-disk", "tied-all-disk"])
def test_pipeline_two_ranks_with_offloaded_layers(ckpt, reference, tiny_tied_ckpt, tmp_path, case):
    """Half of each rank's layers on disk; or, with tied embeddings split over the two
    ranks (sent from rank 0 to rank 1), every unit on disk."""
    tied = case.startswith("tied")
    model_dir = tiny_tied_ckpt if tied else ckpt
    results = {}
    for tier in ("all-disk" if tied else "disk", "none"):
        out = tmp_path / tier
        out.mkdir()
        proc = torchrun(2, [worker("offload_pipeline.py"), str(model_dir), str(out), str(tmp_path / "off"), tier])
        assert proc.returncode == 0, proc.stderr[:4000]
        results[tier] = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    off, none = results["all-disk" if tied else "disk"], results["none"]
    assert all(r["report"]["offloaded_bytes"] > 0 for r in off)        # each rank offloads
    assert all(r["streamed"] and (tied or all(".layers." in n for n in r["streamed"])) for r in off)
    assert torch.equal(off[0]["logits"], none[0]["logits"])
    assert torch.equal(off[0]["tokens"], none[0]["tokens"])
    if tied:
        return
    real = MASK.bool()
    with torch.no_grad():
        torch.testing.assert_close(off[0]["logits"][real], _hf_logits(reference, IDS, MASK)[real],
                                   atol=ATOL, rtol=0)
        hf = reference.generate(IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    assert torch.equal(off[0]["tokens"], hf)


@pytest.mark.multiprocess
def test_peak_memory_within_stage_plus_prefetch_window(tmp_path):
    cfg = tiny_config(num_hidden_layers=8, hidden_size=512, intermediate_size=3072,
                      num_attention_heads=8, num_key_value_heads=4)
    ckpt = make_checkpoint(cfg, tmp_path / "big", num_shards=3, dtype="float32")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    figures = {}
    for tier in ("disk", "none"):
        out = tmp_path / f"{tier}.json"
        proc = subprocess.run([sys.executable, worker("offload_memory.py"), str(ckpt), str(tmp_path / "off"),
                               tier, str(out)], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        figures[tier] = json.loads(out.read_text())
    d, n = figures["disk"], figures["none"]
    unit = max(d["offloaded_unit_bytes"].values())
    window = d["max_resident"] * unit
    # What a forward adds beyond the weights (activations, kernels' scratch), measured on
    # the same model with nothing offloaded; plus a little for the streamer's own objects.
    overhead = max(0, n["peak"] - n["base"] - n["resident_param_bytes"])
    slack = 4 << 20
    assert d["peak_resident_bytes"] <= window
    assert d["peak"] - d["base"] <= d["resident_param_bytes"] + window + overhead + slack, figures
    saved = (n["peak"] - n["base"]) - (d["peak"] - d["base"])
    assert saved >= sum(d["offloaded_unit_bytes"].values()) - window - slack, figures
