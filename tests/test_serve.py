"""`pipe.serve()` / `pipe.close()` and the call announcements behind them: the ranks other
than 0 follow whatever rank 0 runs, idle between calls for longer than the process
group's timeout, and a rank that makes another call than rank 0 fails at once, saying so.
Outputs are checked against transformers."""

from __future__ import annotations

import datetime
import json
import threading
import time

import pytest
import torch
import torch.distributed as dist

from distload.sources.demo import make_checkpoint
from distload.pipeline import calls
from distload.pipeline.calls import CLOSE, FORWARD, GENERATE, CallChannel
from distload.pipeline.microbatch import position_ids_from_mask

from .conftest import tiny_config
from .mp import torchrun, worker

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
TIMEOUT_S = 10  # the process group's timeout in the worker (a loaded machine must start every
#                rank within it); rank 0 idles 12 s


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tiny_config(vocab_size=128), tmp_path_factory.mktemp("serve") / "llama",
                           num_shards=2, dtype="float32", seed=3)


def _hf(ckpt):
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _logits(hf, ids, mask):
    positions = position_ids_from_mask(mask) if mask is not None else None
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=positions).logits


def _close(got, ref, mask=None):
    diff = (got - ref) if mask is None else (got - ref)[mask.bool()]
    return got.shape == ref.shape and float(diff.abs().max()) <= ATOL


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [2, 3])
def test_serving_ranks_follow_rank0_through_idle_time_errors_and_close(ckpt, tmp_path, nproc):
    proc = torchrun(nproc, [worker("pipeline_serve.py"), str(tmp_path), str(ckpt), str(TIMEOUT_S)],
                    timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = torch.load(tmp_path / "serve.pt")
    ids, mask, hf = saved["ids"], saved["mask"], _hf(ckpt)
    assert _close(saved["forward"], _logits(hf, ids, mask), mask)
    # after idling past the timeout: generation goes on, token for token as transformers'
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(saved["generate"], ref)
    expected = [(ids[:2], None), (ids, mask), (ids[3:], None)]
    assert len(saved["stream"]) == 3
    assert all(_close(got, _logits(hf, i, m), m) for got, (i, m) in zip(saved["stream"], expected))
    assert torch.equal(saved["no_tokens"], ids)
    ranks = [json.loads((tmp_path / f"serve_rank{r}.json").read_text()) for r in range(nproc)]
    assert ranks[0]["bad_ids"].startswith("ValueError: token ids must be in [0, 128)")
    assert ranks[0]["bad_tokens"] == "ValueError: max_new_tokens must be 0 or more, got -1"
    # forward, generate, two refused calls, the stream, generate 0 tokens
    assert all(r["served"] == 6 for r in ranks[1:])
    assert ranks[0]["after_close"] == ("RuntimeError: this pipeline was closed; load it again "
                                       "to make more calls")
    assert all(r["after_close"].startswith("RuntimeError: this pipeline was closed by rank 0")
               for r in ranks[1:])


@pytest.mark.multiprocess
def test_calls_that_end_on_rank0_before_a_late_rank_reads_them_are_not_lost(ckpt, tmp_path):
    proc = torchrun(3, [worker("pipeline_serve.py"), str(tmp_path), str(ckpt), "quick"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = torch.load(tmp_path / "quick.pt")
    assert _close(saved["forward"], _logits(_hf(ckpt), saved["ids"], saved["mask"]), saved["mask"])


@pytest.mark.multiprocess
def test_a_rank_making_another_call_than_rank0_fails_at_once(ckpt, tmp_path):
    start = time.monotonic()
    proc = torchrun(2, [worker("pipeline_serve.py"), str(tmp_path), str(ckpt), "mismatch"],
                    timeout=120)
    assert proc.returncode != 0
    assert "this rank called forward but rank 0 called generate" in proc.stderr
    assert "unreachable" not in proc.stderr
    assert time.monotonic() - start < 60  # not the process group's 60 s timeout


# ----------------------------------------------------------------------------- the channel alone

@pytest.fixture
def channels():
    """Rank 0's and a follower's channel over one real TCPStore (server and client)."""
    server = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=10),
                           wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, 2, False,
                           timeout=datetime.timedelta(seconds=10))
    return CallChannel(server, "t/call/", 1), CallChannel(client, "t/call/", 1), server


def test_calls_are_announced_in_order_and_read_keys_go(channels):
    lead, follower, store = channels
    for n, kind in enumerate((FORWARD, GENERATE, FORWARD), start=1):
        lead.announce(kind)
        assert store.check([f"t/call/{n}"])
        follower.expect(kind)
        assert not store.check([f"t/call/{n}"])  # read by every other rank: gone
    # rank 0 may announce calls ahead of a slow reader: none is lost
    lead.announce(GENERATE)
    lead.announce(FORWARD)
    follower.expect(GENERATE)
    follower.expect(FORWARD)
    lead.announce(CLOSE)
    assert follower.next_call() == CLOSE and follower.closed and lead.closed
    with pytest.raises(RuntimeError, match="closed; load it again"):
        lead.announce(FORWARD)
    with pytest.raises(RuntimeError, match="closed by rank 0"):
        follower.next_call()


def test_a_follower_waits_past_the_store_wait_limit_and_names_a_mismatch(channels, monkeypatch):
    monkeypatch.setattr(calls, "_IDLE_CHUNK", datetime.timedelta(milliseconds=50))
    lead, follower, _ = channels
    timer = threading.Timer(0.4, lead.announce, args=(GENERATE,))  # 8 wait limits later
    timer.start()
    with pytest.raises(RuntimeError, match="this rank called forward but rank 0 called generate"):
        follower.expect(FORWARD)
    timer.join()
