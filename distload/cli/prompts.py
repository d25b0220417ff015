"""The CLI's prompts and outputs: token ids from ``--input-ids``, text from ``--prompt``
(through the model directory's ``tokenizer.json``), or JSON lines from ``--input-file``;
generated ids (and text) back out to stdout or ``--output-file``.

Prompts are checked in two steps, both on rank 0 and both before any weight is read (the
CLI hands every rank rank 0's error): `read_prompts` checks their form as soon as the job
starts (a malformed line, an unreadable file); `prepare_requests` turns them into token
ids once the plan gave the model's config (a prompt without a tokenizer, an id outside
the vocabulary, a prompt too long for the model's context with ``--max-new-tokens``).
Each error names the flag or ``file:line`` at fault.

Example::

    prompts = read_prompts(input_file="prompts.jsonl")
    requests, notes = prepare_requests(prompts, model_dir="./llama", vocab_size=32000,
                                       context=4096, max_new_tokens=32)
    ids, mask = left_pad([r.ids for r in requests])
    out = pipe.generate(ids, mask, max_new_tokens=32)
    results = [new_tokens(row, ids.shape[1], eos) for row in out.tolist()]
    write_outputs("out.jsonl", requests, results, tokenizer=load_tokenizer("./llama"))
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Prompt", "Request", "parse_ids", "model_directory", "load_tokenizer", "optional_tokenizer",
           "read_prompts", "prepare_requests", "tokenizer_notes", "collect_requests", "left_pad", "new_tokens",
           "write_outputs", "format_result", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Prompt:
    """One prompt as given, before the model is known: its ids (``--input-ids``, or
    ``"input_ids"`` of a line) or its text; the JSON object it came from, which the
    output echoes; and where it came from, for errors (``--input-ids #2``: the second, ``in.jsonl:3``)."""

    where: str
    record: dict[str, Any] = field(default_factory=dict)
    ids: tuple[int, ...] | None = None
    text: str | None = None


@dataclass(frozen=True)
class Request:
    """One prompt: its token ids, and the JSON object it came from (``--input-file``) or
    its text (``--prompt``), which the output echoes."""

    ids: tuple[int, ...]
    record: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def parse_ids(text: str, flag: str = "--input-ids") -> tuple[int, ...]:
    """``"1,2, 3"`` → ``(1, 2, 3)``; a clear ValueError naming `flag` otherwise."""
    try:
        ids = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give comma-separated integer token ids, "
                         "e.g. --input-ids 1,15,27") from None
    if not ids:
        raise ValueError(f"{flag} {text!r} holds no token ids")
    if any(i < 0 for i in ids):
        raise ValueError(f"{flag} {text!r}: token ids cannot be negative")
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
        raise ValueError(f"--prompt: text prompts need {path}, which does not exist; pass token "
                         "ids with --input-ids (or \"input_ids\" in --input-file) instead")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("--prompt: text prompts need the 'tokenizers' package: "
                         "pip install 'distload[text]' (or pass --input-ids)") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the library's own error types vary
        raise ValueError(f"{path}: not a tokenizer file tokenizers can read ({exc})") from None


def optional_tokenizer(model_dir: str | os.PathLike):
    """The model's tokenizer if it has ``tokenizer.json`` and ``tokenizers`` is
    installed, else None (to show generated ids as text where possible)."""
    try:
        return load_tokenizer(model_dir)
    except ValueError:
        return None


def read_prompts(*, input_ids: Sequence[str] = (), prompts: Sequence[str] = (),
                 input_file: str | None = None) -> list[Prompt]:
    """Every prompt of the run, in order — ``--input-ids`` strings, ``--prompt`` texts,
    then the lines of `input_file` (objects with ``"input_ids"`` or ``"prompt"``) —
    checked for form. Needs no model. Rank 0 calls it."""
    out = [Prompt(f"--input-ids #{i + 1}", ids=parse_ids(text)) for i, text in enumerate(input_ids)]
    out += [Prompt(f"--prompt #{i + 1}", {"prompt": text}, text=text) for i, text in enumerate(prompts)]
    for where, record in _read_jsonl(input_file) if input_file else ():
        if "input_ids" in record:
            ids = record["input_ids"]
            if not (isinstance(ids, list) and ids and all(type(t) is int and t >= 0 for t in ids)):
                raise ValueError(f"{where}: \"input_ids\" must be a non-empty list of token ids "
                                 "(integers from 0)")
            out.append(Prompt(where, record, ids=tuple(ids)))
        elif isinstance(record.get("prompt"), str):
            out.append(Prompt(where, record, text=record["prompt"]))
        else:
            raise ValueError(f"{where}: each line needs \"input_ids\" (a list of token ids) or "
                             "\"prompt\" (text)")
    return out


def prepare_requests(prompts: Sequence[Prompt], *, model_dir: str | os.PathLike | None = None,
                     tokenizer=None, vocab_size: int | None = None, context: int | None = None,
                     max_new_tokens: int = 0) -> tuple[list[Request], list[str]]:
    """The token ids of `prompts`, checked against the model: each id below `vocab_size`,
    each prompt plus `max_new_tokens` within `context` tokens (None: unchecked). Text
    is encoded with `tokenizer`, else ``model_dir/tokenizer.json`` (loaded only if some
    prompt is text). Returns the requests and warnings (a tokenizer whose size differs
    from the model's vocabulary); raises ValueError naming the prompt at fault."""
    notes: list[str] = []
    if tokenizer is None and any(p.text is not None for p in prompts):
        tokenizer = load_tokenizer(model_dir or ".")
    if tokenizer is not None and vocab_size is not None:
        notes += tokenizer_notes(tokenizer.get_vocab_size(with_added_tokens=True), vocab_size)
    requests = []
    for p in prompts:
        ids = p.ids
        if ids is None:
            ids = tuple(tokenizer.encode(p.text).ids)
            if not ids:
                raise ValueError(f"{p.where}: the prompt encodes to no tokens")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ValueError(f"{p.where}: token id {max(ids)} is outside the model's vocabulary "
                             f"(ids 0 to {vocab_size - 1}, vocab_size in config.json)")
        if context is not None and len(ids) + max_new_tokens > context:
            raise ValueError(f"{p.where}: {len(ids)} prompt tokens + --max-new-tokens {max_new_tokens} "
                             f"= {len(ids) + max_new_tokens} tokens, past the model's context of "
                             f"{context} (max_position_embeddings, or n_positions, in config.json)")
        requests.append(Request(ids, p.record, p.where))
    return requests, notes


def tokenizer_notes(tokenizer_size: int, vocab_size: int) -> list[str]:
    """Warnings about a tokenizer whose size differs from the model's vocabulary."""
    if tokenizer_size < vocab_size:
        return [f"the tokenizer knows {tokenizer_size} tokens, fewer than the model's vocabulary "
                f"of {vocab_size}: generated ids from {tokenizer_size} on cannot be shown as text "
                f"(is {TOKENIZER_FILE} the model's own?)"]
    if tokenizer_size > vocab_size:
        return [f"the tokenizer knows {tokenizer_size} tokens, more than the model's vocabulary "
                f"of {vocab_size}: prompts that encode to ids from {vocab_size} on are refused"]
    return []


def collect_requests(*, input_ids: Sequence[str] = (), prompts: Sequence[str] = (),
                     input_file: str | None = None, model_dir: str | os.PathLike | None = None,
                     tokenizer=None) -> list[Request]:
    """`read_prompts` then `prepare_requests` without a model to check against."""
    return prepare_requests(read_prompts(input_ids=input_ids, prompts=prompts, input_file=input_file),
                            model_dir=model_dir, tokenizer=tokenizer)[0]


def _read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(``path:line``, object) per non-blank line; a ValueError naming the line otherwise."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"--input-file {path}: cannot read it: {reason}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
        records.append((f"{path}:{lineno}", record))
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


def format_result(ids: Sequence[int], tokenizer=None) -> str:
    """One prompt's result as one line of stdout: its generated text, with backslashes,
    newlines and carriage returns written as ``\\\\``, ``\\n``, ``\\r`` (so each prompt stays one
    line), or without a tokenizer its generated ids, comma-separated (as --input-ids
    takes them)."""
    if tokenizer is None:
        return ",".join(map(str, ids))
    text = tokenizer.decode(list(ids))
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def write_outputs(path: str | os.PathLike, requests: Sequence[Request],
                  outputs: Sequence[Sequence[int]], tokenizer=None) -> None:
    """One JSON line per request: its input object (or ``{"input_ids": ...}``) plus
    ``"output_ids"`` and, with a tokenizer, ``"output_text"``. Written to a temporary
    file and renamed, so the output appears complete or not at all; ``-`` writes to
    stdout."""
    lines = []
    for request, ids in zip(requests, outputs):
        record = dict(request.record) or {"input_ids": list(request.ids)}
        record["output_ids"] = list(ids)
        if tokenizer is not None:
            record["output_text"] = tokenizer.decode(list(ids))
        lines.append(json.dumps(record) + "\n")
    if os.fspath(path) == "-":
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
