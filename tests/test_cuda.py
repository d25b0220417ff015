"""The GPU read path and the offload tiers on a CUDA device (marker `cuda`; skipped
without one — `scripts/gpu_check.sh` runs them where a GPU is).

* the staged read into CUDA tensors is bit-exact against safetensors for several
  threads, chunks, misaligned offsets, with and without O_DIRECT;
* its ring is pinned, two buffers per thread, and bounded;
* a cast runs on the device after the raw bytes were copied (no conversion on the CPU);
* each thread's host-to-device copy overlaps its next read and runs on its own stream,
  and a buffer is reused only after its copy finished;
* a whole load on the GPU (cast, O_DIRECT) equals safetensors;
* the offload tiers on a GPU: the CPU tier streams from pinned host memory, the disk tier
  prefetches on a side stream; forward and generate equal the all-resident model's and
  transformers'.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import distload
from distload.io import read_tensors
from distload.io import direct as direct_mod
from distload.io import staging as staging_mod
from distload.io.segments import BLOCK
from distload.offload import streamer_of
from distload.plan.types import Tier
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config
from .odd_files import assert_equal, make_dests, odd_checkpoint
from .workers.offload_common import half_on_disk

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STAGING = 64 << 10
IDS = torch.tensor([[3, 17, 42, 9, 100, 7, 55, 21], [0, 0, 0, 5, 6, 7, 8, 9]])
MASK = torch.tensor([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])


@pytest.fixture(scope="module")
def odd_ckpt(tmp_path_factory):
    return odd_checkpoint(tmp_path_factory.mktemp("odd-cuda"))


@pytest.fixture
def allocations(monkeypatch):
    """Every staging buffer made: (size, pinned), and the buffers themselves."""
    made: list = []
    real = staging_mod._allocate

    def counting(size, pin):
        buf = real(size, pin)
        made.append((size, pin, buf[0]))
        return buf

    monkeypatch.setattr(staging_mod, "_allocate", counting)
    return made


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("direct_io", [False, True])
def test_read_into_cuda_bit_exact_pinned_and_bounded(odd_ckpt, allocations, workers, direct_io):
    files, metas, reference = odd_ckpt
    dests = make_dests(metas, device="cuda")
    stats = read_tensors(metas, dests, workers=workers, staging_bytes=STAGING, direct_io=direct_io)
    assert_equal(dests, reference)
    assert allocations and len(allocations) <= workers * staging_mod.BUFFERS
    assert all(size + BLOCK == STAGING and pin and buf.is_pinned() for size, pin, buf in allocations)
    assert 0 < stats.staging_bytes <= workers * staging_mod.BUFFERS * STAGING
    assert stats.direct_files + stats.refused_files == (len(files) if direct_io else 0)


def _cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels (not copies or fills) that `fn` ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if not n.startswith(("Memcpy", "Memset"))]


@pytest.mark.parametrize("cast", [torch.float32, torch.float16])
def test_cast_runs_on_the_device(odd_ckpt, monkeypatch, cast):
    _, metas, reference = odd_ckpt

    def no_host_copies(copies):
        raise AssertionError("a CUDA destination was converted on the CPU")

    monkeypatch.setattr(staging_mod, "_host_copies", no_host_copies)
    plain = make_dests(metas, device="cuda")
    assert _cuda_kernels(lambda: read_tensors(metas, plain, workers=2, staging_bytes=STAGING)) == []
    assert_equal(plain, reference)
    dests = make_dests(metas, cast, device="cuda")
    kernels = _cuda_kernels(lambda: read_tensors(metas, dests, workers=2, staging_bytes=STAGING))
    assert kernels, "no conversion kernel ran on the device"
    assert_equal(dests, reference, cast)


def test_copy_overlaps_the_next_read_on_its_own_stream(odd_ckpt, monkeypatch):
    """Each copy is slowed on the device (a 20 ms sleep kernel queued before it): the
    thread still preads the next segment while it runs, on a stream of its own, and
    reuses a buffer only once its copy is done (else the bytes would be wrong)."""
    _, metas, reference = odd_ckpt
    events, streams, overlapped = [], [], []
    real_copy = staging_mod.CudaCopier.copy

    def slow_copy(self, copies):
        streams.append(self.stream)
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(40_000_000)          # ~20 ms at ~2 GHz
        out = real_copy(self, copies)
        events.extend(out)
        return out

    real_read = direct_mod.FileHandle.read_segment

    def watched_read(self, buffer, seg, stats):
        if events:
            overlapped.append(not events[-1].query())   # the last copy still running?
        return real_read(self, buffer, seg, stats)

    monkeypatch.setattr(staging_mod.CudaCopier, "copy", slow_copy)
    monkeypatch.setattr(direct_mod.FileHandle, "read_segment", watched_read)
    dests = make_dests(metas, device="cuda")
    read_tensors(metas, dests, workers=1, staging_bytes=STAGING)
    assert_equal(dests, reference)
    assert len(events) >= 4 and any(overlapped), "every read waited for the previous copy"
    assert all(s != torch.cuda.default_stream() for s in streams) and len(set(map(id, streams))) == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda-ckpt") / "tiny"
    return make_checkpoint(tiny_config(num_hidden_layers=4), out, num_shards=3, dtype="float32", seed=7)


@pytest.mark.parametrize("dtype,direct_io", [(None, False), ("float16", True), ("bfloat16", False)])
def test_load_on_the_gpu_equals_safetensors(tiny, dtype, direct_io):
    pipe = distload.load(str(tiny), device="cuda", dtype=dtype, direct_io=direct_io, read_workers=3,
                         staging_bytes="64KiB")
    assert pipe.device.type == "cuda"
    want = getattr(torch, dtype) if dtype else None
    metas = {m.name: m.located(pipe.root) for m in pipe.plan.stage(0).reads}
    for src in pipe.plan.stage(0).params:
        with safe_open(metas[src.key].file, framework="pt") as f:
            ref = f.get_tensor(src.key)
        mine = pipe.module.get_parameter(src.param)
        assert mine.is_cuda and torch.equal(mine.cpu(), ref.to(want) if want else ref), src.param
    assert 0 < pipe.report["staging_bytes"] <= 3 * staging_mod.BUFFERS * STAGING


def _load(ckpt, monkeypatch, offload_dir, tier):
    import distload.loader.api as api

    plan_load = api.plan_load
    with monkeypatch.context() as m:
        if tier is not None:
            m.setattr(api, "plan_load", lambda *a: half_on_disk(plan_load(*a), tier))
        return distload.load(str(ckpt), device="cuda", offload_dir=str(offload_dir))


@torch.no_grad()
@pytest.mark.parametrize("tier", [Tier.CPU, Tier.DISK])
def test_offload_tiers_on_the_gpu(tiny, tmp_path, monkeypatch, tier):
    transformers = pytest.importorskip("transformers")
    plain = _load(tiny, monkeypatch, tmp_path / "off", None)
    pipe = _load(tiny, monkeypatch, tmp_path / "off", tier)
    streamer = streamer_of(pipe.module)
    assert streamer is not None and streamer.unit_names == ["model.layers.2", "model.layers.3"]
    if tier == Tier.CPU:   # the CPU tier streams from pinned host memory
        hosts = [s for u in streamer.units for s in u.sources.values()]
        assert hosts and all(isinstance(s, torch.Tensor) and s.is_pinned() for s in hosts)
        # one arena of the tier's bytes (each view aligned), no power-of-two rounding
        tier_bytes = sum(s.numel() * s.element_size() for s in hosts)
        assert tier_bytes <= pipe.report["pinned_bytes"] <= tier_bytes + 512 * len(hosts) + 4096
    else:                  # the disk tier is fetched on a side stream, through reused staging
        assert streamer._side is not None and streamer._side != torch.cuda.current_stream()
        largest = max(u.nbytes for u in streamer.units)
        assert pipe.report["pinned_bytes"] == streamer.pinned_bytes
        assert 2 * largest <= streamer.pinned_bytes <= 2 * (largest + 512 * 16)
    ids, mask = IDS.cuda(), MASK.cuda()
    logits = pipe.forward(ids, mask)
    assert logits.is_cuda and torch.equal(logits, plain.forward(ids, mask))
    tokens = pipe.generate(ids, mask, max_new_tokens=6)
    assert torch.equal(tokens, plain.generate(ids, mask, max_new_tokens=6))
    assert streamer.stats.fetches >= 2 * 7 and streamer.stats.prefetched > 0
    assert streamer.stats.peak_resident <= 2
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).cuda().eval()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    hf = reference(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], hf[real], atol=1e-3, rtol=0)
    hf_tokens = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
    assert torch.equal(tokens, hf_tokens)
