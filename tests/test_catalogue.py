"""A catalogue of bad checkpoints and configs, each run through the CLI on 2 ranks: every
rank must exit with an error code within 60 s, its last line one ERROR line naming the
file and the field or tensor at fault, with no traceback and no C++ abort.

Each case is a job of its own (`tests/workers/cli_catalogue.py` runs the CLI's `main` once
per case in the same two processes, on a fresh port), so 50 jobs cost seconds, not
minutes. Plus property-based fuzzing of the header parser and the config validator."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from distload.checkpoint import read_safetensors_header
from distload.errors import CheckpointError
from distload.models.validate import validate_config
from distload.sources.demo import make_checkpoint

from .conftest import tiny_config
from .mp import Ranks, free_port, worker

CASES: dict[str, Callable[[Path], tuple[str, ...]]] = {}


def case(fn):
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


# --------------------------------------------------------------------- helpers on a copy

def _config(root: Path, **changes) -> tuple[str, ...]:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(changes)
    (root / "config.json").write_text(json.dumps(cfg))
    return ("config.json", next(iter(changes)))


def _shard(root: Path, index: int = 0) -> Path:
    return sorted(root.glob("*.safetensors"))[index]


def _raw(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _write_raw(path: Path, header, data: bytes, n: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)


def _edit_header(root: Path, edit) -> tuple[str, ...]:
    shard = _shard(root)
    header, data = _raw(shard)
    name = sorted(k for k in header if k != "__metadata__")[0]
    needle = edit(header, name)
    _write_raw(shard, header, data)
    return (shard.name, needle or name)


def _tensors(root: Path, edit) -> tuple[str, ...]:
    shard = _shard(root)
    tensors = load_file(str(shard))
    needle = edit(tensors)
    save_file(tensors, str(shard))
    return (needle,)


# --------------------------------------------------------------------- config.json

@case
def case_heads_zero(r): return _config(r, num_attention_heads=0)
@case
def case_hidden_string(r): return _config(r, hidden_size="64")
@case
def case_eps_not_a_number(r): return _config(r, rms_norm_eps="abc")
@case
def case_vocab_absurd(r): return _config(r, vocab_size=10**12)
@case
def case_no_layers(r): return _config(r, num_hidden_layers=0)
@case
def case_negative_layers(r): return _config(r, num_hidden_layers=-3)
@case
def case_kv_heads_do_not_divide(r): return _config(r, num_key_value_heads=3)
@case
def case_rope_theta_negative(r): return _config(r, rope_theta=-1.0)
@case
def case_max_positions_string(r): return _config(r, max_position_embeddings="x")
@case
def case_tie_not_bool(r): return _config(r, tie_word_embeddings="yes")
@case
def case_hidden_float(r): return _config(r, hidden_size=64.5)
@case
def case_intermediate_zero(r): return _config(r, intermediate_size=0)
@case
def case_eps_nan(r): return _config(r, rms_norm_eps=float("nan"))
@case
def case_unknown_model_type(r): return _config(r, model_type="mamba")
@case
def case_rope_type_unsupported(r):
    return _config(r, rope_scaling={"rope_type": "dynamic", "factor": 2.0}) [:1] + ("dynamic",)
@case
def case_activation_unsupported(r): return _config(r, hidden_act="gelu")[:1] + ("gelu",)


@case
def case_config_not_json(r):
    (r / "config.json").write_text("{not json")
    return ("config.json", "cannot parse")


@case
def case_config_not_object(r):
    (r / "config.json").write_text("[1, 2]")
    return ("config.json", "not an object")


@case
def case_config_nested_deep(r):
    (r / "config.json").write_text('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    return ("config.json", "nested too deeply")


@case
def case_config_missing(r):
    (r / "config.json").unlink()
    return ("config.json", "missing")


# --------------------------------------------------------------------- shard headers

@case
def case_header_length_past_end(r):
    shard = _shard(r)
    blob = bytearray(shard.read_bytes())
    blob[:8] = struct.pack("<Q", 1 << 40)
    shard.write_bytes(bytes(blob))
    return (shard.name, "header length")


@case
def case_file_shorter_than_8_bytes(r):
    _shard(r).write_bytes(b"\x01\x02")
    return (_shard(r).name, "shorter than the 8-byte")


@case
def case_truncated_shard(r):
    shard = _shard(r)
    shard.write_bytes(shard.read_bytes()[:-100])
    return (shard.name, "truncated")


@case
def case_header_not_utf8(r):
    shard = _shard(r)
    _write_raw(shard, b"\xff\xfe{}", b"")
    return (shard.name, "UTF-8")


@case
def case_header_not_json(r):
    _write_raw(_shard(r), b"{nope", b"")
    return (_shard(r).name, "not valid JSON")


@case
def case_header_not_object(r):
    _write_raw(_shard(r), b"[1]", b"")
    return (_shard(r).name, "not an object")


@case
def case_header_duplicate_tensor(r):
    shard = _shard(r)
    header, data = _raw(shard)
    name = sorted(k for k in header if k != "__metadata__")[0]
    text = json.dumps(header)[:-1] + f', "{name}": ' + json.dumps(header[name]) + "}"
    _write_raw(shard, text.encode(), data)
    return (shard.name, "duplicate")


@case
def case_header_nested_deep(r):
    shard = _shard(r)
    _write_raw(shard, ('{"x": ' + "[" * 50_000 + "]" * 50_000 + "}").encode(), b"")
    return (shard.name, "nested too deeply")


@case
def case_entry_missing_dtype(r):
    return _edit_header(r, lambda h, n: h[n].pop("dtype") and None)


@case
def case_shape_not_a_list(r):
    return _edit_header(r, lambda h, n: h[n].update(shape="big"))


@case
def case_unknown_dtype(r):
    return _edit_header(r, lambda h, n: h[n].update(dtype="Q7") or "Q7")


@case
def case_begin_after_end(r):
    return _edit_header(r, lambda h, n: h[n].update(data_offsets=[8, 4]))


@case
def case_offsets_past_data(r):
    def edit(h, n):
        begin, end = h[n]["data_offsets"]
        h[n]["data_offsets"] = [begin, end + 10**9]
    return _edit_header(r, edit)


@case
def case_overlapping_tensors(r):
    def edit(h, n):
        names = sorted(k for k in h if k != "__metadata__")
        first, second = sorted(names, key=lambda k: h[k]["data_offsets"][0])[:2]
        h[second]["data_offsets"] = [x - 4 for x in h[second]["data_offsets"]]
        return "overlap"
    return _edit_header(r, edit)


@case
def case_size_mismatch(r):
    def edit(h, n):
        h[n]["shape"] = [int(h[n]["shape"][0]) + 1, *h[n]["shape"][1:]]
    return _edit_header(r, edit)


@case
def case_bytes_after_last_tensor(r):
    with open(_shard(r), "ab") as f:
        f.write(b"\0" * 64)
    return (_shard(r).name, "after the last tensor")


# --------------------------------------------------------------------- index and files

def _index(r: Path) -> dict:
    return json.loads((r / "model.safetensors.index.json").read_text())


def _set_index(r: Path, index) -> None:
    (r / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))


@case
def case_index_not_json(r):
    _set_index(r, "{broken")
    return ("model.safetensors.index.json", "cannot parse")


@case
def case_index_without_weight_map(r):
    _set_index(r, {"metadata": {}})
    return ("model.safetensors.index.json", "weight_map")


def _point_first_key_at(r: Path, shard: str) -> str:
    """The index's first key now lives in `shard`; returns that key."""
    index = _index(r)
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = shard
    _set_index(r, index)
    return name


@case
def case_index_names_missing_shard(r):
    name = _point_first_key_at(r, "model-99999-of-99999.safetensors")
    return ("model-99999-of-99999.safetensors", "does not exist", name)


@case
def case_index_escapes_root(r):
    _point_first_key_at(r, "../elsewhere.safetensors")
    return ("../elsewhere.safetensors", "outside")


@case
def case_index_absolute_shard(r):
    _point_first_key_at(r, "/etc/passwd")
    return ("/etc/passwd", "outside")


@case
def case_index_wrong_shard(r):
    index = _index(r)
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in sorted(index["weight_map"].items()) if s == shards[0])
    index["weight_map"][name] = shards[1]
    _set_index(r, index)
    return (shards[1], name)


@case
def case_shard_is_a_directory(r):
    shard = _shard(r)
    shard.unlink()
    shard.mkdir()
    return (shard.name, "is a directory")


@case
def case_shard_is_a_fifo(r):
    shard = _shard(r)
    shard.unlink()
    os.mkfifo(shard)
    return (shard.name, "FIFO")


@case
def case_shard_links_outside(r):
    shard = _shard(r)
    outside = r.parent / f"{r.name}-outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    return (shard.name, "outside the checkpoint")


@case
def case_shard_empty_file(r):
    _shard(r).write_bytes(b"")
    return (_shard(r).name, "shorter than the 8-byte")


# --------------------------------------------------------------------- model vs checkpoint

@case
def case_missing_tensor(r):
    def edit(tensors):
        name = sorted(tensors)[0]
        del tensors[name]
        return name
    needle = _tensors(r, edit)
    index = _index(r)
    del index["weight_map"][needle[0]]
    _set_index(r, index)
    return ("missing from the checkpoint", *needle)


@case
def case_index_names_tensor_the_shard_lacks(r):
    def edit(tensors):
        name = sorted(tensors)[0]
        del tensors[name]
        return name
    return (_shard(r).name, "lacks it", *_tensors(r, edit))


@case
def case_unexpected_tensor(r):
    return ("unexpected key", *_tensors(r, lambda t: t.__setitem__("model.extra.weight", torch.ones(2)) or "model.extra.weight"))


@case
def case_wrong_shape_tensor(r):
    def edit(tensors):
        name = sorted(tensors)[0]
        tensors[name] = torch.zeros(3, 3)
        return name
    return ("shape mismatch", *_tensors(r, edit))


@case
def case_integer_weight(r):
    def edit(tensors):
        name = next(n for n in sorted(tensors) if n.endswith("norm.weight"))
        tensors[name] = tensors[name].view(torch.int32)
        return name
    return ("int32", *_tensors(r, edit))


# --------------------------------------------------------------------- .bin

def _as_bin(r: Path, state) -> None:
    for f in r.glob("*.safetensors"):
        f.unlink()
    (r / "model.safetensors.index.json").unlink()
    torch.save(state, r / "pytorch_model.bin")


@case
def case_bin_with_pickled_payload(r):
    _as_bin(r, {"w": torch.ones(2), "x": Path("/tmp")})
    return ("pytorch_model.bin", "unpickle")


@case
def case_bin_not_a_state_dict(r):
    _as_bin(r, [torch.ones(2)])
    return ("pytorch_model.bin", "not a state dict")


@case
def case_bin_garbage(r):
    _as_bin(r, {"w": torch.ones(2)})
    (r / "pytorch_model.bin").write_bytes(b"garbage" * 10)
    return ("pytorch_model.bin",)


# --------------------------------------------------------------------- the run

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("catalogue") / "good"
    return make_checkpoint(tiny_config(num_hidden_layers=2), out, num_shards=2, dtype="float32", seed=8)


@pytest.mark.multiprocess
def test_every_bad_checkpoint_stops_every_rank_with_one_line_naming_it(ckpt, tmp_path):
    assert len(CASES) >= 40
    cases, needles = [], {}
    for name, make in CASES.items():
        root = tmp_path / name
        shutil.copytree(ckpt, root)
        needles[name] = make(root)
        cases.append({"name": name, "port": free_port(),
                      "argv": ["--device", "cpu", "--model", str(root), "--max-new-tokens", "0"]})
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    (tmp_path / "out").mkdir()
    job = Ranks([[worker("cli_catalogue.py"), str(spec), str(tmp_path / "out")]] * 2, tmp_path / "out")
    assert job.wait(600) == [0, 0], job.stderr(0)[-3000:] + job.stderr(1)[-3000:]
    results = [json.loads((tmp_path / "out" / f"catalogue{r}.json").read_text()) for r in (0, 1)]
    failures = []
    for name in CASES:
        for rank, result in enumerate(r[name] for r in results):
            text, lines = result["stderr"], result["stderr"].strip().splitlines()
            last = lines[-1] if lines else ""
            problems = [
                f"exit {result['code']}" if result["code"] not in (1, 2) else "",
                f"{result['seconds']:.0f} s" if result["seconds"] > 60 else "",
                "a traceback" if "Traceback" in text else "",
                "terminate called" if "terminate called" in text else "",
                f"last line {last!r}" if not last.startswith(f"[rank {rank}] ERROR ") else "",
                *(f"no {needle!r} in {last!r}" for needle in needles[name] if needle not in last),
            ]
            if any(problems):
                failures.append(f"{name} rank {rank}: " + "; ".join(p for p in problems if p))
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------- fuzzing

_GOOD_HEADER = {"__metadata__": {"format": "pt"},
                "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                "b": {"dtype": "I64", "shape": [1], "data_offsets": [24, 32]}}
_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() |
                            st.text(max_size=6),
                            lambda children: st.lists(children, max_size=3) |
                            st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from([("a",), ("a", "dtype"), ("a", "shape"), ("a", "data_offsets"), ("b",),
                             ("__metadata__",), ("c",)]),
       value=_json_values, data_len=st.integers(0, 64), cut=st.integers(0, 400))
def test_header_mutations_raise_only_checkpoint_errors(tmp_path, path, value, data_len, cut):
    header = json.loads(json.dumps(_GOOD_HEADER))
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    text = json.dumps(header).encode()
    blob = struct.pack("<Q", len(text)) + text + b"\0" * data_len
    file = tmp_path / "m.safetensors"
    file.write_bytes(blob[:len(blob) - cut] if cut < len(blob) else blob)
    try:
        metas = read_safetensors_header(file)
    except CheckpointError:
        return
    size = file.stat().st_size
    for m in metas:  # whatever it accepts lies inside the file and claims no more than it has
        assert 0 <= m.offset and m.offset + m.length <= size
        assert m.numel * m.torch_dtype.itemsize == m.length


_BASE = {**tiny_config(), "model_type": "llama"}


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(_BASE) + ["head_dim", "sliding_window", "rope_scaling", "layer_types"]),
       value=_json_values)
def test_config_mutations_raise_only_value_errors(key, value):
    from distload.models import config_from_dict

    config = {**_BASE, key: value}
    try:
        validate_config(config)
        config_from_dict(config)
    except ValueError:
        return
