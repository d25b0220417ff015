"""The CLI's prompts and outputs: token ids from ``--input-ids``, text from ``--prompt``
(through the model directory's ``tokenizer.json``), or JSON lines from ``--input-file``;
generated ids (and text) back out to the log and ``--output-file``.

Only rank 0 reads and writes files; `distload.load`'s CLI broadcasts the prompts so every
rank agrees on whether there is anything to generate.

Example::

    requests = collect_requests(input_file="prompts.jsonl", model_dir="./llama")
    ids, mask = left_pad([r.ids for r in requests])
    out = pipe.generate(ids, mask, max_new_tokens=32)
    results = [new_tokens(row, ids.shape[1], eos) for row in out.tolist()]
    write_outputs("out.jsonl", requests, results, tokenizer=load_tokenizer("./llama"))
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Request", "parse_ids", "model_directory", "load_tokenizer", "optional_tokenizer",
           "collect_requests", "left_pad", "new_tokens", "write_outputs", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Request:
    """One prompt: its token ids, and the JSON object it came from (``--input-file``) or
    its text (``--prompt``), which the output echoes."""

    ids: tuple[int, ...]
    record: dict[str, Any] = field(default_factory=dict)


def parse_ids(text: str) -> tuple[int, ...]:
    """``"1,2, 3"`` → ``(1, 2, 3)``; a clear ValueError otherwise."""
    try:
        ids = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise ValueError(f"--input-ids takes comma-separated integers, got {text!r}: {e}") from None
    if not ids:
        raise ValueError(f"--input-ids {text!r} holds no token ids")
    return ids


def model_directory(checkpoint: str | os.PathLike) -> Path:
    """The directory of a checkpoint path (the path itself if it is a directory)."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def load_tokenizer(model_dir: str | os.PathLike):
    """The `tokenizers.Tokenizer` of ``model_dir/tokenizer.json``. Raises ValueError
    saying what is missing (the file, or the optional ``tokenizers`` package)."""
    path = model_directory(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"text prompts need {path}, which does not exist; pass token ids "
                         "with --input-ids (or \"input_ids\" in --input-file) instead")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("text prompts need the 'tokenizers' package: "
                         "pip install 'distload[text]' (or pass --input-ids)") from None
    return Tokenizer.from_file(str(path))


def optional_tokenizer(model_dir: str | os.PathLike):
    """The model's tokenizer if it has ``tokenizer.json`` and ``tokenizers`` is
    installed, else None (to show generated ids as text where possible)."""
    try:
        return load_tokenizer(model_dir)
    except ValueError:
        return None


def collect_requests(*, input_ids: Sequence[str] = (), prompts: Sequence[str] = (),
                     input_file: str | None = None, model_dir: str | os.PathLike | None = None,
                     tokenizer=None) -> list[Request]:
    """Every prompt of the run, in order: ``--input-ids`` strings, ``--prompt`` texts, then
    the lines of `input_file` (objects with ``"input_ids"`` or ``"prompt"``). The
    tokenizer is loaded from `model_dir` only if some prompt is text. Rank 0 calls it."""
    requests = [Request(parse_ids(text)) for text in input_ids]
    records: list[dict[str, Any]] = [{"prompt": p} for p in prompts]
    if input_file:
        records += _read_jsonl(input_file)
    for i, record in enumerate(records):
        if "input_ids" in record:
            ids = record["input_ids"]
            if not (isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids)):
                raise ValueError(f"{_where(input_file, i)}: \"input_ids\" must be a non-empty "
                                 "list of integers")
            requests.append(Request(tuple(ids), record))
        elif isinstance(record.get("prompt"), str):
            if tokenizer is None:
                tokenizer = load_tokenizer(model_dir or ".")
            ids = tuple(tokenizer.encode(record["prompt"]).ids)
            if not ids:
                raise ValueError(f"{_where(input_file, i)}: the prompt encodes to no tokens")
            requests.append(Request(ids, record))
        else:
            raise ValueError(f"{_where(input_file, i)}: each object needs \"input_ids\" "
                             "(a list of token ids) or \"prompt\" (text)")
    return requests


def _where(input_file: str | None, index: int) -> str:
    return f"prompt {index + 1}" if input_file is None else f"{input_file}: entry {index + 1}"


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            records.append(record)
    return records


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths → ids ``[B, T]`` padded on the left with `pad_id`,
    and the attention mask (1 for real tokens)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def new_tokens(row: Sequence[int], prompt_width: int, eos: Sequence[int] = ()) -> list[int]:
    """The generated part of one output row: up to and including its first EOS (what
    follows an EOS is padding)."""
    generated = list(row[prompt_width:])
    for i, token in enumerate(generated):
        if token in eos:
            return generated[:i + 1]
    return generated


def write_outputs(path: str | os.PathLike, requests: Sequence[Request],
                  outputs: Sequence[Sequence[int]], tokenizer=None) -> None:
    """One JSON line per request: its input object (or ``{"input_ids": ...}``) plus
    ``"output_ids"`` and, with a tokenizer, ``"output_text"``. Written to a temporary
    file and renamed, so the output appears complete or not at all."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for request, ids in zip(requests, outputs):
                record = dict(request.record) or {"input_ids": list(request.ids)}
                record["output_ids"] = list(ids)
                if tokenizer is not None:
                    record["output_text"] = tokenizer.decode(list(ids))
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
