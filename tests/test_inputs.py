"""The CLI checks its inputs before any weight is read, and says so once: a bad flag is
one line on rank 0 and exit status 2 on every rank; a bad prompt, input-file line or
length names itself and stops the job before a byte of a weight is read (a spy on the
reader sees nothing); a tokenizer that does not fit the model and sampling flags without
--do-sample are warnings."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from distload.io import PosixReader
from distload.cli.config import parse_args
from distload.cli.main import run
from distload.errors import UsageError
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config
from .mp import torchrun, worker

WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


@pytest.fixture(scope="module")
def small_tokenizer_ckpt(tmp_path_factory):
    """A tiny llama (vocab 256, context 256) with a 10-word tokenizer.json beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = make_checkpoint(tiny_config(), tmp_path_factory.mktemp("inputs") / "llama", num_shards=2,
                           dtype="float32", seed=4)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture
def reads(monkeypatch):
    """Every read the loader makes (mapped or preadv), by the `Reader` methods it calls."""
    calls = []
    for name, method in (("read_tensors", "read"), ("map_tensors", "map")):
        real = getattr(PosixReader, method)

        def spy(self, items, *args, _real=real, _name=name, **kwargs):
            calls.append((_name, len(items)))
            return _real(self, items, *args, **kwargs)
        monkeypatch.setattr(PosixReader, method, spy)
    return calls


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("argv, message", [
    (["--input-ids", "a,b"], "--input-ids 'a,b': give comma-separated integer token ids"),
    (["--input-ids", "1,-2"], "--input-ids '1,-2': token ids cannot be negative"),
    (["--device", "foo"], "--device foo: give cpu or cuda"),
    (["--nope"], "unrecognized arguments: --nope"),
    (["--max-new-tokens", "x"], "--max-new-tokens: invalid int value: 'x'"),
])
def test_a_bad_flag_is_one_line_and_status_2(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "usage:" not in err
    monkeypatch.setenv("RANK", "1")           # the other ranks say nothing, and exit 2 too
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2 and capsys.readouterr().err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "--device cuda: " in capsys.readouterr().err


def test_sampling_flags_without_do_sample_warn():
    assert parse_args(["--temperature", "0.7", "--top-k", "5"]).warnings() == [
        "--temperature, --top-k only apply with --do-sample; generating greedily"]
    assert parse_args(["--temperature", "0.7", "--do-sample"]).warnings() == []
    assert parse_args([]).sampling_temperature == 1.0


# ----------------------------------------------------------------------------- inputs

def _run(*argv: str):
    return run(parse_args(["--device", "cpu", "--max-new-tokens", "2", *argv]))


def test_bad_input_file_lines_fail_before_loading(tiny_ckpt, tmp_path, reads):
    src = tmp_path / "in.jsonl"
    src.write_text('{"input_ids": [1, 2]}\n\n{"input_ids": [3,\n')
    with pytest.raises(UsageError, match=r"in\.jsonl:3: not JSON"):
        _run("--model", str(tiny_ckpt), "--input-file", str(src))
    src.write_text('{"input_ids": [1, 2.5]}\n')
    with pytest.raises(UsageError, match=r"in\.jsonl:1: \"input_ids\" must be a non-empty list"):
        _run("--model", str(tiny_ckpt), "--input-file", str(src))
    with pytest.raises(UsageError, match=r"--input-file .*missing\.jsonl: cannot read it"):
        _run("--model", str(tiny_ckpt), "--input-file", str(tmp_path / "missing.jsonl"))
    src.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(UsageError, match=r"--input-file .*in\.jsonl: cannot read it"):
        _run("--model", str(tiny_ckpt), "--input-file", str(src))
    assert reads == []


def test_prompts_that_do_not_fit_the_model_fail_before_any_read(tiny_ckpt, tmp_path, reads):
    with pytest.raises(UsageError, match=r"--prompt: text prompts need .*tokenizer\.json"):
        _run("--model", str(tiny_ckpt), "--prompt", "hello")
    with pytest.raises(UsageError, match=r"--input-ids #2: token id 256 is outside the model's "
                                         r"vocabulary \(ids 0 to 255"):
        _run("--model", str(tiny_ckpt), "--input-ids", "1,2", "--input-ids", "3,256")
    with pytest.raises(UsageError, match=r"--input-ids #1: 3 prompt tokens \+ --max-new-tokens 254 "
                                         r"= 257 tokens, past the model's context of 256"):
        _run("--model", str(tiny_ckpt), "--input-ids", "1,2,3", "--max-new-tokens", "254")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"input_ids": [5, 300], "id": 7}) + "\n")
    with pytest.raises(UsageError, match=r"in\.jsonl:1: token id 300 is outside"):
        _run("--model", str(tiny_ckpt), "--input-file", str(src))
    assert reads == []


def test_a_tokenizer_smaller_than_the_vocabulary_warns_and_runs(small_tokenizer_ckpt, reads, caplog,
                                                                  capsys):
    with caplog.at_level(logging.WARNING, logger="distload"):
        assert _run("--model", str(small_tokenizer_ckpt), "--prompt", "the cat sat") == 0
    assert ["the tokenizer knows 10 tokens, fewer than the model's vocabulary of 256: generated ids "
            "from 10 on cannot be shown as text (is tokenizer.json the model's own?)"] == [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert reads and len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.multiprocess
def test_a_bad_flag_under_torchrun_is_said_once(tiny_ckpt):
    proc = torchrun(2, ["distload.load", "--device", "cpu", "--model", str(tiny_ckpt),
                        "--input-ids", "1,x"], module=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count("give comma-separated integer token ids") == 1
    assert "usage:" not in proc.stderr


@pytest.mark.multiprocess
def test_a_bad_flag_is_said_by_rank_0_even_when_it_starts_last(tiny_ckpt):
    """Rank 1 fails on the flag first; torchrun must not stop rank 0 before it says why."""
    proc = torchrun(2, [worker("cli_slowed.py"), "--device", "cpu", "--model", str(tiny_ckpt),
                        "--input-ids", "1,x"], timeout=60,
                    env={"DISTLOAD_TEST_SLOW_START": "3", "DISTLOAD_TEST_SLOW_RANK": "0"})
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert proc.stderr.count("give comma-separated integer token ids") == 1


@pytest.mark.multiprocess
def test_an_id_outside_the_vocabulary_stops_every_rank_before_reading(tiny_ckpt, tmp_path):
    report = tmp_path / "r.json"
    proc = torchrun(2, [worker("cli_observed.py"), "--device", "cpu", "--model", str(tiny_ckpt),
                        "--input-ids", "1,2,999", "--report", str(report)], timeout=90)
    assert proc.returncode != 0
    assert "spy:" not in proc.stderr and not report.exists()
    said = [line for line in proc.stderr.splitlines()
            if "--input-ids #1: token id 999 is outside the model's vocabulary" in line]
    assert any(line.startswith("[rank 0]") for line in said)


def test_a_result_is_one_line():
    from distload.cli.prompts import format_result

    class Text:
        def decode(self, ids):
            return "a\\b\nc\r"

    assert format_result([5, 6, 7]) == "5,6,7"
    assert format_result([1], Text()) == "a\\\\b\\nc\\r"
