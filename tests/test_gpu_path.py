"""The GPU path's ordering and accounting, on the CPU: CUDA streams and events replaced by
fakes that record what is ordered after what (the reader's copies wait on the caller's
stream, on every reader thread; a staging buffer is reused only after the blocking event
recorded after its copies), NCCL-like transfers whose `wait()` returns at once (the
pipeline's waits still block the host and name a dead peer), and the pinned CPU tier's
size under the caching host allocator's power-of-two rounding."""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import pytest
import torch

from distload.errors import RankError
from distload.io import pinned as pinned_memory
from distload.io.staging import BUFFERS, CudaCopier, StagingAccount, StagingRing
from distload.io.stats import ReadStats
from distload.io.worker import run_workers
from distload.loader.api import plan_job
from distload.loader.materialize import allocate_stage
from distload.loader.skeleton import build_stage_skeleton
from distload.pipeline import comm
from distload.plan.types import Tier
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config


# ----------------------------------------------------------------------------- streams, events

class _Stream:
    def __init__(self, name: str) -> None:
        self.name, self.waited_on = name, []

    def wait_stream(self, other: "_Stream") -> None:
        self.waited_on.append(other)


class _Event:
    def __init__(self, blocking: bool) -> None:
        self.blocking, self.recorded_on, self.synchronized = blocking, None, False

    def record(self, stream: _Stream) -> None:
        self.recorded_on = stream

    def synchronize(self) -> None:
        assert self.recorded_on is not None, "waited on an event never recorded"
        self.synchronized = True


class _FakeCuda:
    """torch.cuda's streams and events as the reader uses them: a current stream per
    thread (a new thread's is the default stream), as CUDA has."""

    def __init__(self) -> None:
        self.default, self.local = _Stream("default"), threading.local()
        self.streams: list[_Stream] = []
        self.events: list[_Event] = []

    def current_stream(self, device=None) -> _Stream:
        return getattr(self.local, "stream", self.default)

    @contextlib.contextmanager
    def stream(self, stream: _Stream):
        before = self.current_stream()
        self.local.stream = stream
        try:
            yield
        finally:
            self.local.stream = before

    def device(self, device):
        return contextlib.nullcontext()

    def Stream(self, device=None) -> _Stream:  # noqa: N802 - torch.cuda's name
        self.streams.append(_Stream(f"stream{len(self.streams)}"))
        return self.streams[-1]

    def Event(self, enable_timing=False, blocking=False, interprocess=False) -> _Event:  # noqa: N802
        self.events.append(_Event(blocking))
        return self.events[-1]


def test_reader_copies_follow_the_callers_stream_and_reuse_buffers_after_their_events(monkeypatch):
    fake = _FakeCuda()
    for name in ("current_stream", "stream", "device", "Stream", "Event"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    dest = torch.zeros(8, 64, dtype=torch.uint8)
    checked = []

    class Worker:  # one reader thread as `SegmentWorker` runs it: its ring and its copier
        def __init__(self) -> None:
            self.ring = StagingRing(4096, BUFFERS, pin=False, account=StagingAccount())
            self.copier, self.released, self.stats = None, {}, ReadStats()

        def run(self, seg: int) -> None:
            if self.copier is None:
                self.copier = CudaCopier(torch.device("cuda", 0))
            k = self.ring.acquire()
            # every event released with this buffer has been waited on before it is reused
            checked.append(all(e.synchronized for e in self.released.get(k, ())))
            buf = self.ring.buffer(k)[:64]
            buf.fill_(seg)
            piece = SimpleNamespace(skip=0, length=64, itemsize=1)
            self.released[k] = self.copier.copy([(dest[seg], piece, buf, torch.uint8)])
            self.ring.release(k, self.released[k])

        def close(self) -> None:
            self.ring.close()

    caller = fake.Stream()
    with torch.cuda.stream(caller):
        run_workers(list(range(8)), 2, make_worker=Worker, device=torch.device("cuda", 0))
    copiers = fake.streams[1:]  # made on the pool's threads, never the caller's
    assert 1 <= len(copiers) <= 2 and all(s.waited_on == [caller] for s in copiers)
    assert torch.equal(dest, torch.arange(8, dtype=torch.uint8)[:, None].expand(8, 64))
    assert len(checked) == 8 and all(checked)
    assert len(fake.events) == 8
    assert all(e.blocking and e.recorded_on in copiers and e.synchronized for e in fake.events)


# ----------------------------------------------------------------------------- host waits

class _DeviceWork:
    """An NCCL transfer: `wait()` returns at once (it only orders the current stream);
    only `is_completed` tells when the data is there."""

    def __init__(self, polls_to_finish: int | None) -> None:
        self.polls, self.finish = 0, polls_to_finish

    def is_completed(self) -> bool:
        self.polls += 1
        return self.finish is not None and self.polls >= self.finish

    def wait(self) -> bool:
        return True


def _fake_p2p(monkeypatch, work: _DeviceWork) -> None:
    fake = SimpleNamespace(isend=lambda tensor, dst, group=None: work,
                           irecv=lambda tensor, src, group=None: work)
    monkeypatch.setattr(comm, "dist", fake)
    monkeypatch.setattr(comm, "_CHECK_PEERS_S", 0.0)


def test_device_waits_block_the_host_until_the_transfer_is_done(monkeypatch):
    work = _DeviceWork(polls_to_finish=5)
    _fake_p2p(monkeypatch, work)
    monkeypatch.setattr(comm, "peers_gone", lambda ranks: [])
    assert comm.post_recv((4,), torch.float32, torch.device("meta"), src=1).wait().shape == (4,)
    assert work.polls == 5
    out, work.polls = comm.Outbox(), 0
    out.send(torch.empty(4, device="meta"), dst=1)
    out.wait()
    assert work.polls >= 5


def test_device_wait_on_a_dead_peer_names_it(monkeypatch):
    _fake_p2p(monkeypatch, _DeviceWork(polls_to_finish=None))
    monkeypatch.setattr(comm, "peers_gone", lambda ranks: [r for r in ranks if r == 2])
    with pytest.raises(RankError, match="no data from rank 2.*process is gone"):
        comm.post_recv((4,), torch.float32, torch.device("meta"), src=2).wait()


def test_device_wait_gives_up_before_the_watchdog(monkeypatch):
    _fake_p2p(monkeypatch, _DeviceWork(polls_to_finish=None))
    monkeypatch.setattr(comm, "peers_gone", lambda ranks: [])
    monkeypatch.setattr(comm, "group_timeout_s", lambda: 0.05)
    out = comm.Outbox()
    out.send(torch.empty(4, device="meta"), dst=3)
    with pytest.raises(RankError, match="could not send to rank 3.*no answer"):
        out.wait()


# ----------------------------------------------------------------------------- pinned bytes

def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def test_pinned_cpu_tier_takes_what_the_plan_counted_not_the_allocators_rounding(monkeypatch, tmp_path):
    # sizes that are no power of two (a 96 x 352 float32 MLP weight, 132 KiB, would pin 256)
    config = tiny_config(hidden_size=96, intermediate_size=352, vocab_size=200, num_hidden_layers=2)
    plan = plan_job(str(make_checkpoint(config, tmp_path / "m", num_shards=1,
                                           dtype="float32", seed=0)), device="cpu")
    stage = plan.stage(0)
    taken: list[int] = []  # bytes each pinning takes
    empty = torch.empty

    def caching_empty(*args, pin_memory=False, **kwargs):  # the caching host allocator
        t = empty(*args, **kwargs)
        if pin_memory:
            taken.append(_power_of_two(t.numel() * t.element_size()))
        return t

    def caching_pin(self, *args, **kwargs):
        taken.append(_power_of_two(self.numel() * self.element_size()))
        return self.clone()

    monkeypatch.setattr(torch, "empty", caching_empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", caching_pin)
    monkeypatch.setattr(pinned_memory, "_registers", lambda: True)  # cudaHostRegister: exact pages
    monkeypatch.setattr(pinned_memory, "_register", lambda pages, address, nbytes: taken.append(nbytes))
    storage = allocate_stage(plan, 0, build_stage_skeleton(plan, 0), torch.device("cuda", 0),
                             tiers={p.key: Tier.CPU for p in stage.params})
    planned = stage.param_bytes
    assert sum(t.numel() * t.element_size() for t in storage.values()) == planned
    assert all(t.device.type == "cpu" for t in storage.values())
    slack = pinned_memory.ALIGN * len(storage) + 4096
    assert planned <= sum(taken) <= planned + slack, (sum(taken), planned)
    assert len(taken) == 1  # one arena
    # the views are the arena's, and hold their own bytes
    for key, t in storage.items():
        t.view(-1)[:1] = 1
    assert len({t.untyped_storage().data_ptr() for t in storage.values()}) == 1


def test_pinned_pages_stay_registered_while_any_view_lives(monkeypatch):
    import gc
    import mmap

    calls, pages = [], -(-10_000 // mmap.PAGESIZE) * mmap.PAGESIZE

    class Cudart:  # the driver's registration, recorded
        def cudaHostRegister(self, address, nbytes, flags):  # noqa: N802 - CUDA's name
            calls.append(("register", address, nbytes))
            return 0

        def cudaHostUnregister(self, address):  # noqa: N802
            calls.append(("unregister", address))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    buffer = pinned_memory.pin_host(10_000)
    assert buffer.numel() == 10_000 and buffer.data_ptr() % mmap.PAGESIZE == 0
    assert calls == [("register", buffer.data_ptr(), pages)]  # whole pages, no power of two
    view = buffer[100:200].view(torch.float32)
    view.fill_(1.0)
    del buffer
    gc.collect()
    assert len(calls) == 1  # a view still uses the pages
    address = calls[0][1]
    del view
    gc.collect()
    assert calls[1:] == [("unregister", address)]
