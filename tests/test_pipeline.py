"""Pipelined forward: the schedule's pure parts, then logits of `pipe.forward` under
torchrun (gloo on CPU, 2 and 3 ranks) against transformers, the independent reference,
on llama (llama3 RoPE), tied llama, mistral (sliding window) and qwen2 (attention bias),
with and without left padding; and a rank that fails mid-forward stopping every rank."""

from __future__ import annotations

import json
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from distload.sources.demo import make_checkpoint
from distload.pipeline.inputs import validate_inputs
from distload.pipeline.schedules.forward_stream import batches_in_flight
from distload.pipeline.messages import ABORT, BATCH, DROP, END, PREFILL, STEP, STOP, ForwardHeader, StepHeader
from distload.pipeline.microbatch import micro_batch_slices, position_ids_from_mask, prefill_parts, split_sizes

from .conftest import tiny_config
from .mp import torchrun, worker
from .workers.pipeline_inputs import batch

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
BASE = tiny_config(vocab_size=128)
MODELS = {
    "llama": {"model_type": "llama", "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}},
    "llama_tied": {"model_type": "llama", "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "sliding_window": 4},
    "qwen2": {"model_type": "qwen2"},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    return {name: make_checkpoint({**BASE, **extra}, root / name, num_shards=3, dtype="float32",
                                  seed=i)
            for i, (name, extra) in enumerate(MODELS.items())}


def _reference(ckpt, ids, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    positions = position_ids_from_mask(mask) if mask is not None else None
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions).logits


# ----------------------------------------------------------------------------- pure parts

@given(st.integers(1, 200), st.integers(1, 20))
def test_split_sizes_cover_the_batch_evenly(batch_size, parts):
    sizes = split_sizes(batch_size, parts)
    assert sum(sizes) == batch_size and len(sizes) == min(parts, batch_size)
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert list(sizes) == sorted(sizes, reverse=True)
    slices = micro_batch_slices(batch_size, parts)
    assert [s.stop - s.start for s in slices] == list(sizes)
    assert slices[0].start == 0 and slices[-1].stop == batch_size


def test_split_rejects_nonsense():
    with pytest.raises(ValueError, match="micro_batches"):
        split_sizes(4, 0)
    with pytest.raises(ValueError, match="batch"):
        split_sizes(0, 2)


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert position_ids_from_mask(mask, 2).tolist() == [[1, 2], [3, 4], [1, 2]]


@given(st.sampled_from([STEP, DROP, STOP, PREFILL]), st.integers(0, 50),
       st.lists(st.integers(0, 63), max_size=8), st.integers(0, 4096))
def test_step_header_round_trips(kind, group, keep, tokens):
    header = StepHeader(kind, group, tuple(keep), tokens)
    encoded = header.encode(max_rows=8)
    assert encoded.dtype == torch.long and encoded.shape == (StepHeader.length(8),)
    assert StepHeader.decode(encoded) == header


@given(st.sampled_from([BATCH, END, ABORT]), st.integers(0, 10**6), st.integers(0, 10**6),
       st.integers(0, 64), st.booleans(), st.integers(0, 4096))
def test_forward_header_round_trips(kind, rows, length, parts, masked, message):
    header = ForwardHeader(kind, rows, length, parts, masked, message)
    encoded = header.encode()
    assert encoded.dtype == torch.long and encoded.shape == (ForwardHeader.LENGTH,)
    assert ForwardHeader.decode(encoded) == header
    with pytest.raises(ValueError, match="corrupt"):
        ForwardHeader.decode(torch.zeros(ForwardHeader.LENGTH, dtype=torch.long))


def test_enough_batches_in_flight_to_fill_every_stage():
    # micro-batches in flight (all but the one rank 0 is starting) cover the other stages
    for stages in range(1, 9):
        for m in range(1, 9):
            depth = batches_in_flight(stages, m)
            assert (depth - 1) * m >= stages - 1 and (depth - 2) * m < max(stages - 1, 1)
    assert batches_in_flight(2, 4) == 2 and batches_in_flight(3, 1) == 3


def test_prefill_parts_fill_the_pipeline_within_the_group():
    assert prefill_parts(1, 1, 100) == 1           # no pipeline: the prompt in one piece
    assert prefill_parts(2, 2, 64) == 4            # 8 pieces in all over 2 stages
    assert prefill_parts(3, 3, 64) == 4
    assert prefill_parts(2, 2, 3) == 3             # never more parts than rows
    for stages in range(2, 9):
        for groups in range(1, 9):
            parts = prefill_parts(stages, groups, 1000)
            assert groups * parts >= 4 * stages > groups * (parts - 1)


def test_step_header_rejects_corruption():
    with pytest.raises(ValueError, match="at most"):
        StepHeader(STEP, 0, (0, 1, 2), 1).encode(max_rows=2)
    with pytest.raises(ValueError, match="corrupt"):
        StepHeader.decode(torch.zeros(6, dtype=torch.long))


def test_validate_inputs_says_what_is_wrong():
    ids = torch.tensor([[1, 2, 3]])
    assert validate_inputs(torch.tensor([1, 2]), None, 10)[0].shape == (1, 2)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        validate_inputs(ids * 5, None, 10)
    with pytest.raises(TypeError, match="integer"):
        validate_inputs(ids.float(), None, 10)
    with pytest.raises(ValueError, match="must match"):
        validate_inputs(ids, torch.ones(1, 2), 10)
    with pytest.raises(ValueError, match="only 0"):
        validate_inputs(ids, torch.full((1, 3), 2), 10)
    with pytest.raises(ValueError, match="at least one real token"):
        validate_inputs(ids, torch.zeros(1, 3), 10)


def test_activation_dtype_follows_the_cast(checkpoints):
    import distload

    pipe = distload.load(str(checkpoints["llama"]), device="cpu")
    assert pipe.activation_dtype == torch.float32
    pipe16 = distload.load(str(checkpoints["llama"]), device="cpu", dtype="bfloat16")
    assert pipe16.activation_dtype == torch.bfloat16


# ----------------------------------------------------------------------------- one process

def test_single_process_forward_matches_transformers(checkpoints):
    import distload

    ckpt = checkpoints["llama_tied"]
    pipe = distload.load(str(ckpt), device="cpu")
    ids, mask = batch(BASE["vocab_size"])
    ref = _reference(ckpt, ids, mask)
    for m in (1, 2, 5):
        logits = pipe.forward(ids, mask, micro_batches=m)
        assert logits.shape == ref.shape
        assert (logits - ref)[mask.bool()].abs().max() <= ATOL


def test_single_process_forward_stream_matches_transformers(checkpoints):
    import distload

    ckpt = checkpoints["qwen2"]
    pipe = distload.load(str(ckpt), device="cpu")
    ids, mask = batch(BASE["vocab_size"])
    ref = _reference(ckpt, ids, mask)
    outputs = list(pipe.forward_stream([(ids, mask), {"input_ids": ids[1:3], "attention_mask":
                                                      mask[1:3]}], micro_batches=2))
    assert len(outputs) == 2 and list(pipe.forward_stream([])) == []
    assert (outputs[0] - ref)[mask.bool()].abs().max() <= ATOL
    assert (outputs[1] - ref[1:3])[mask[1:3].bool()].abs().max() <= ATOL
    with pytest.raises(TypeError, match="iterable of batches"):
        list(pipe.forward_stream(ids))
    with pytest.raises(ValueError, match="input_ids or \\(input_ids, attention_mask\\)"):
        list(pipe.forward_stream([(ids, mask, None)]))


# ----------------------------------------------------------------------------- torchrun

@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [2, 3])
def test_pipelined_forward_matches_transformers(checkpoints, tmp_path, nproc):
    names = list(MODELS)
    proc = torchrun(nproc, [worker("pipeline_forward.py"), str(tmp_path),
                            *(str(checkpoints[n]) for n in names)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in names:
        saved = torch.load(tmp_path / f"{name}.pt")
        ids, mask = saved["ids"], saved["mask"]
        ref_plain = _reference(checkpoints[name], ids, None)
        ref_padded = _reference(checkpoints[name], ids, mask)
        assert (saved["plain"] - ref_plain).abs().max() <= ATOL, name
        for case in ("padded", "padded_m5"):
            diff = (saved[case] - ref_padded)[mask.bool()].abs().max()
            assert diff <= ATOL, (name, case, float(diff))
        ranks = [json.loads((tmp_path / f"{name}_rank{r}.json").read_text()) for r in range(nproc)]
        assert ranks[0]["none_returned"] == []
        assert all(r["none_returned"] == ["plain", "padded", "padded_m5"] for r in ranks[1:])
        assert "model.embed_tokens" in ranks[0]["units"] and "lm_head" in ranks[-1]["units"]
        assert all(len(r["units"]) >= 1 for r in ranks)
        # nothing of the load's (heartbeat, progress monitor) wakes during the calls
        assert all(r["threads"] == ["MainThread"] for r in ranks), [r["threads"] for r in ranks]
        # a bad input on rank 0 fails every rank, rank 0's own error everywhere
        assert "ValueError: token ids must be in" in ranks[0]["bad_input_error"]
        assert all("rank 0 failed: ValueError: token ids" in r["bad_input_error"] for r in ranks[1:])


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [2, 3])
def test_forward_stream_matches_transformers_and_survives_early_exit_and_errors(
        checkpoints, tmp_path, nproc):
    ckpt = checkpoints["llama_tied"]
    proc = torchrun(nproc, [worker("pipeline_stream.py"), str(tmp_path), str(ckpt)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = torch.load(tmp_path / "stream.pt")
    ids, mask, plain = saved["ids"], saved["mask"], saved["plain"]
    ref_padded, ref_plain = _reference(ckpt, ids, mask), _reference(ckpt, plain, None)
    expected = [(ref_padded, mask), (ref_plain, None), (ref_padded[:2], mask[:2]),
                (ref_padded[2:], mask[2:]), (_reference(ckpt, ids[4:], None), None)]
    assert len(saved["stream"]) == len(expected)
    for i, (got, (ref, m)) in enumerate(zip(saved["stream"], expected)):
        assert got.shape == ref.shape, i
        diff = (got - ref) if m is None else (got - ref)[m.bool()]
        assert diff.abs().max() <= ATOL, (i, float(diff.abs().max()))
    # after leaving early, after rank 0's iterator failed, after a wrong argument:
    # the next call goes through and is right
    assert (saved["after_break"] - ref_padded)[mask.bool()].abs().max() <= ATOL
    for key in ("after_abort", "after_type_error"):
        assert (saved[key] - ref_plain).abs().max() <= ATOL, key
    ranks = [json.loads((tmp_path / f"stream_rank{r}.json").read_text()) for r in range(nproc)]
    assert all(r["empty"] == 0 for r in ranks)
    assert ranks[0]["stream_none"] == [False] * 5
    assert all(r["stream_none"] == [True] * 5 for r in ranks[1:])
    # rank 0 left after one batch; the others finished the batch already in flight too
    assert ranks[0]["left_early_seen"] == [False]
    depth = batches_in_flight(nproc, 2)
    assert all(r["left_early_seen"] == [True] * depth for r in ranks[1:])
    # the iterator's error: rank 0 raises its own, the others carry it, after the batches
    # before it went through everywhere
    assert ranks[0]["iterator_error"] == "OSError: cannot read batch 3 of prompts.bin"
    assert all(r["iterator_error"] == "CallAborted: rank 0 failed: OSError: cannot read batch 3 "
               "of prompts.bin" for r in ranks[1:])
    assert all(len(r["iterator_seen"]) <= 2 for r in ranks)
    assert all(r["iterator_seen"] == [True, True] for r in ranks[1:])
    assert ranks[0]["tensor_error"].startswith("TypeError: forward_stream needs an iterable")
    assert all(r["tensor_error"].startswith("CallAborted: rank 0 failed: TypeError: forward_stream")
               for r in ranks[1:])
    assert ranks[0]["open_stream_error"].startswith("RuntimeError: a forward_stream is still open")
    assert all(r["open_stream_batches"] == 3 for r in ranks)


@pytest.mark.multiprocess
def test_rank_failing_mid_forward_stops_every_rank(checkpoints):
    start = time.monotonic()
    proc = torchrun(2, [worker("pipeline_fail.py"), str(checkpoints["llama"]), "forward", "1"],
                    timeout=90)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert "RuntimeError: injected stage failure on rank 1" in proc.stderr
    assert "finished without an error" not in proc.stdout + proc.stderr
