"""Generation: sampling against transformers' logits warpers, the CLI's prompt handling,
greedy tokens of `pipe.generate` (one process, and under torchrun with 2 and 3 ranks)
against transformers' `generate(do_sample=False)`, EOS, seeded sampling, a rank failing
mid-decode, and the CLI end to end with a JSON-lines file and text prompts."""

from __future__ import annotations

import json
import time

import pytest
import torch

from distload.sources.demo import make_checkpoint
from distload.pipeline.inputs import resolve_eos
from distload.pipeline.schedules.ring_decode import pipeline_generate
from distload.pipeline.sampling import Sampler, SamplingConfig, warp_logits
from distload.cli.prompts import (
    Request, collect_requests, left_pad, load_tokenizer, new_tokens, parse_ids, write_outputs,
)

from .conftest import tiny_config
from .mp import torchrun, worker
from .workers.pipeline_inputs import batch

transformers = pytest.importorskip("transformers")

NEW = 16
CONFIG = tiny_config(vocab_size=128)
WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny llama with a word-level tokenizer.json next to it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = make_checkpoint(CONFIG, tmp_path_factory.mktemp("gen") / "llama", num_shards=3,
                           dtype="float32", seed=3)
    vocab = {w: i for i, w in enumerate(WORDS)} | {f"w{i}": i for i in range(len(WORDS), 128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def hf(ckpt):
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def _hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                           pad_token_id=0, **kw)


def _pick_eos(greedy: torch.Tensor, width: int) -> int:
    """A token that ends some rows early but not all of them."""
    new = greedy[:, width:]
    for token in new[1, 1:6].tolist():
        hit = (new == token).any(dim=1)
        if 0 < int(hit.sum()) < new.shape[0]:
            return token
    return int(new[1, 2])


# ----------------------------------------------------------------------------- sampling

def test_warp_logits_equals_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [(1.0, None, None), (0.7, 20, None), (1.3, None, 0.8),
                                      (0.9, 50, 0.95), (1.0, 1, None), (1.0, None, 1e-4)]:
        ref = logits.clone()
        if temperature != 1.0:
            ref = TemperatureLogitsWarper(temperature)(None, ref)
        if top_k is not None:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p is not None:
            ref = TopPLogitsWarper(top_p)(None, ref)
        ours = warp_logits(logits, SamplingConfig(True, temperature, top_k, top_p))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_sampler_is_greedy_without_sampling_and_reproducible_per_sequence():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    greedy = Sampler(SamplingConfig(), torch.device("cpu"))
    assert torch.equal(greedy(logits, [0, 1, 2, 3]), logits.argmax(-1))
    cfg = SamplingConfig(do_sample=True, temperature=2.0, seed=5)
    draws = [Sampler(cfg, torch.device("cpu"))(logits, [0, 1, 2, 3]) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    # a sequence's draw depends on its own index and logits, not on its batch neighbours
    alone = Sampler(cfg, torch.device("cpu"))(logits[2:3], [2])
    assert alone.item() == draws[0][2].item()
    other = Sampler(SamplingConfig(do_sample=True, temperature=2.0, seed=6), torch.device("cpu"))
    steps = [Sampler(cfg, torch.device("cpu")), other]
    seq = [[s(logits, [0, 1, 2, 3]).tolist() for _ in range(8)] for s in steps]
    assert seq[0] != seq[1]


@pytest.mark.parametrize("kw, match", [({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k"),
                                       ({"top_p": 1.5}, "top_p")])
def test_sampling_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(do_sample=True, **kw)


def test_resolve_eos_follows_transformers_defaults():
    assert resolve_eos(None, None, {"eos_token_id": 2}) == ((2,), 2)
    assert resolve_eos(None, None, {"eos_token_id": [2, 7], "pad_token_id": 0}) == ((2, 7), 0)
    assert resolve_eos([], None, {"eos_token_id": 2}) == ((), 0)
    assert resolve_eos(5, 1, {}) == ((5,), 1)


# ----------------------------------------------------------------------------- prompts

def test_prompt_helpers(ckpt, tmp_path):
    assert parse_ids("1, 2,3") == (1, 2, 3)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_ids("1,x")
    ids, mask = left_pad([(5, 6, 7), (8,)])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert new_tokens([0, 8, 3, 2, 0, 0], 2, eos=(2,)) == [3, 2]
    assert new_tokens([8, 3, 4], 1) == [3, 4]

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"input_ids": [4, 5], "id": "a"}) + "\n\n"
                   + json.dumps({"prompt": "the cat sat", "id": "b"}) + "\n")
    requests = collect_requests(input_file=str(src), model_dir=ckpt)
    assert [r.ids for r in requests] == [(4, 5), (2, 3, 4)]
    out = tmp_path / "out.jsonl"
    write_outputs(out, requests, [[6, 7], [8]], tokenizer=load_tokenizer(ckpt))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"input_ids": [4, 5], "id": "a", "output_ids": [6, 7], "output_text": "a mat"}
    assert lines[1]["id"] == "b" and lines[1]["output_text"] == "dog"
    write_outputs(out, [Request((1, 2))], [[3]])
    assert json.loads(out.read_text()) == {"input_ids": [1, 2], "output_ids": [3]}


def test_prompt_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json.*--input-ids"):
        collect_requests(prompts=["hello"], model_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1]}\n\n{"text": "no"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:3: each line needs.*input_ids"):
        collect_requests(input_file=str(bad), model_dir=tmp_path)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not JSON"):
        collect_requests(input_file=str(bad), model_dir=tmp_path)


# ----------------------------------------------------------------------------- one process

def test_single_process_generate_matches_transformers(ckpt, hf):
    import distload

    pipe = distload.load(str(ckpt), device="cpu")
    ids, mask = batch(CONFIG["vocab_size"])
    ref = _hf_generate(hf, ids, mask)
    for groups in (1, 2):
        out = pipeline_generate(pipe, ids, mask, max_new_tokens=NEW, micro_batches=groups)
        assert torch.equal(out, ref), (out[:, ids.shape[1]:], ref[:, ids.shape[1]:])
    eos = _pick_eos(ref, ids.shape[1])
    ref_eos = _hf_generate(hf, ids, mask, eos_token_id=eos)
    out = pipeline_generate(pipe, ids, mask, max_new_tokens=NEW, micro_batches=2, eos_token_id=eos,
                            pad_token_id=0)
    assert torch.equal(out, ref_eos)
    # 3 groups of at most 2, one at a time / 5 groups of 1, 2 at a time
    for slots, size in ((1, 2), (2, 1)):
        out = pipeline_generate(pipe, ids, mask, max_new_tokens=NEW, micro_batches=slots,
                                group_size=size, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out, ref_eos), (slots, size)
    with pytest.raises(ValueError, match="group_size must be at least 1"):
        pipe.generate(ids, mask, group_size=0)


def test_groups_beyond_those_in_flight_wait_and_finished_ones_free_their_cache(ckpt, monkeypatch):
    import distload
    from distload.pipeline.schedules import ring_decode as generate

    live = []
    prefill = generate._StageRunner.prefill

    def counting(self, group, part, x):
        out = prefill(self, group, part, x)
        live.append(len(self.groups))  # groups holding a KV cache on this stage
        return out

    monkeypatch.setattr(generate._StageRunner, "prefill", counting)
    pipe = distload.load(str(ckpt), device="cpu")
    ids, mask = batch(CONFIG["vocab_size"])
    pipeline_generate(pipe, ids, mask, max_new_tokens=4, micro_batches=2, group_size=1)
    assert len(live) == 5 and max(live) == 2  # 5 groups of one sequence, 2 at a time
    assert torch.equal(pipe.generate(ids, mask, max_new_tokens=0), ids)


# ----------------------------------------------------------------------------- torchrun

@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc", [2, 3])
def test_pipelined_generate_matches_transformers(ckpt, hf, tmp_path, nproc):
    ids, mask = batch(CONFIG["vocab_size"])
    ref = _hf_generate(hf, ids, mask)
    eos = _pick_eos(ref, ids.shape[1])
    ref_eos = _hf_generate(hf, ids, mask, eos_token_id=eos)
    assert ref_eos.shape[1] < ref.shape[1] or (ref_eos == 0).any()  # EOS really stops rows
    proc = torchrun(nproc, [worker("pipeline_generate.py"), str(tmp_path), str(ckpt), str(eos)],
                    timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "generate.pt")
    assert torch.equal(got["ids"], ids) and torch.equal(got["mask"], mask)
    assert torch.equal(got["greedy"], ref)
    assert torch.equal(got["greedy_groups3"], ref)
    assert torch.equal(got["eos"], ref_eos)
    assert torch.equal(got["eos_refill"], ref_eos)
    assert torch.equal(got["greedy_refill"], ref)
    a, b, c = got["sample_a"], got["sample_b"], got["sample_c"]
    assert a.shape == (5, ids.shape[1] + 12) and torch.equal(a[:, :ids.shape[1]], ids)
    assert torch.equal(a, b)        # same seed, different grouping: same tokens
    assert not torch.equal(a, c)    # another seed


@pytest.mark.multiprocess
def test_rank_failing_mid_decode_stops_every_rank(ckpt):
    start = time.monotonic()
    proc = torchrun(3, [worker("pipeline_fail.py"), str(ckpt), "generate", "1"], timeout=90)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert "RuntimeError: injected stage failure on rank 1" in proc.stderr
    assert "finished without an error" not in proc.stdout + proc.stderr


@pytest.mark.multiprocess
@pytest.mark.parametrize("max_batch_size", [None, 2])
def test_cli_generates_from_a_jsonl_file(ckpt, hf, tmp_path, max_batch_size):
    src, dst = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts = [(3, 4, 5, 6), (2, 8, 9), (7, 3)]
    src.write_text(json.dumps({"input_ids": list(prompts[0]), "id": 1}) + "\n"
                   + json.dumps({"prompt": "the dog ran", "id": 2}) + "\n"
                   + json.dumps({"input_ids": list(prompts[2]), "id": 3}) + "\n")
    extra = ["--max-batch-size", str(max_batch_size)] if max_batch_size else []
    proc = torchrun(2, ["distload.load", "--device", "cpu", "--model", str(ckpt), "--input-file",
                        str(src), "--output-file", str(dst), "--max-new-tokens", "6", *extra],
                    module=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [line["id"] for line in lines] == [1, 2, 3]
    # transformers on the same batches: all at once, or by length (2 then 1) in chunks of 2
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if max_batch_size else [0, 1, 2]
    size = max_batch_size or len(prompts)
    expected = [None] * len(prompts)
    for first in range(0, len(prompts), size):
        batch = order[first:first + size]
        ids, mask = left_pad([prompts[i] for i in batch])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0)
        for i, row in zip(batch, ref[:, ids.shape[1]:].tolist()):
            expected[i] = row
    assert [line["output_ids"] for line in lines] == expected
    assert all(isinstance(line["output_text"], str) for line in lines)
    assert "tokens/s" in proc.stderr
    assert ("3 of 3 prompts done" in proc.stderr) == (max_batch_size == 2)


def test_cli_text_prompt_without_tokenizer_is_a_clear_error(tmp_path, capfd):
    from distload.load import main

    plain = make_checkpoint(CONFIG, tmp_path / "plain", num_shards=1, dtype="float32")
    assert main(["--device", "cpu", "--model", str(plain), "--prompt", "hello"]) == 2   # usage
    assert "tokenizer.json" in capfd.readouterr().err


@pytest.mark.multiprocess
def test_demo_run_results_on_stdout_figures_in_the_report(tmp_path):
    """Results go to stdout, one line per prompt, even at --log-level WARNING (which keeps
    stderr free of everything else); the generation's figures go to the report."""
    report = tmp_path / "r.json"
    proc = torchrun(2, ["distload.load", "--device", "cpu", "--max-new-tokens", "4", "--cache-dir",
                        str(tmp_path), "--log-level", "WARNING", "--report", str(report)],
                    module=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert all(len(line.split(",")) == 4 and all(t.isdigit() for t in line.split(",")) for line in lines)
    assert "[rank" not in proc.stderr and "INFO" not in proc.stderr
    figures = json.loads(report.read_text())
    gen = figures["generation"]
    assert gen["prompts"] == 2 and gen["generated_tokens"] == 8 and gen["tokens_per_second"] > 0
    assert gen["prompt_tokens"] == 10 and gen["decode_tokens"] == 6     # demo prompts: 6 + 4 ids
    assert 0 < gen["time_to_first_token_seconds"] <= gen["seconds"]
    assert gen["prefill_tokens_per_second"] > 0 and gen["decode_tokens_per_second"] > 0
    assert figures["phases"]["first_forward_seconds"] == gen["time_to_first_token_seconds"]
