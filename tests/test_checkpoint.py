"""Checkpoint headers, indexes and .bin files, checked against safetensors' own reader.

Every malformed case is a hand-made file (raw bytes), and every error must name the file
(and the tensor where one is at fault). Good cases are compared bit-exactly with
`safetensors.safe_open`, an independent implementation.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import distload.checkpoint.safetensors_header as sh
from distload.checkpoint import (
    CheckpointIndex,
    TensorMeta,
    index_checkpoint,
    index_from_headers,
    load_bin_tensors,
    read_bin_metas,
    read_safetensors_header,
    read_weight_map,
    write_sharded_checkpoint,
)
from distload.errors import CheckpointError

HAS_FP8 = hasattr(torch, "float8_e4m3fn")


# ---------------------------------------------------------------- helpers


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", *, n: int | None = None) -> Path:
    """Write a safetensors-like file byte by byte: <Q n> + header + data."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def read_bytes(meta: TensorMeta) -> bytes:
    with open(meta.file, "rb") as f:
        raw = os.pread(f.fileno(), meta.length, meta.offset)
    assert len(raw) == meta.length
    return raw


def as_tensor(meta: TensorMeta) -> torch.Tensor:
    raw = bytearray(read_bytes(meta))
    if not raw:
        return torch.empty(meta.shape, dtype=meta.torch_dtype)
    return torch.frombuffer(raw, dtype=meta.torch_dtype).reshape(meta.shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def check_against_safetensors(metas: list[TensorMeta]) -> None:
    """Each meta's byte range, viewed with its dtype/shape, equals safe_open's tensor."""
    by_file: dict[str, list[TensorMeta]] = {}
    for m in metas:
        by_file.setdefault(m.file, []).append(m)
    for file, ms in by_file.items():
        with safe_open(file, framework="pt") as f:
            assert sorted(f.keys()) == sorted(m.name for m in ms)
            for m in ms:
                assert same_bits(as_tensor(m), f.get_tensor(m.name)), m.name


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(4, 3, 2, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (3, 3), dtype=torch.uint8, generator=g),
        "i64": torch.arange(5, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    if HAS_FP8:
        t["fp8_e4m3"] = (torch.randn(6, 2, generator=g) * 4).to(torch.float8_e4m3fn)
        t["fp8_e5m2"] = torch.randn(5, generator=g).to(torch.float8_e5m2)
    return t


def make_sharded(tmp_path: Path, n_layers: int = 6) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tensors = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g).bfloat16()}
    for i in range(n_layers):
        tensors[f"model.layers.{i}.mlp.weight"] = torch.randn(8, 8, generator=g)
        tensors[f"model.layers.{i}.norm.weight"] = torch.ones(8, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = torch.randn(16, 8, generator=g)
    out = write_sharded_checkpoint(
        tensors.items(), tmp_path / "ckpt", config={"model_type": "llama"}, max_shard_bytes=600
    )
    return out, tensors


# ---------------------------------------------------------------- good headers


def test_header_matches_safetensors_bit_exact(tmp_path):
    tensors = sample_tensors()
    file = tmp_path / "m.safetensors"
    save_file(tensors, str(file), metadata={"format": "pt"})
    metas = read_safetensors_header(file)

    assert {m.name for m in metas} == set(tensors)  # __metadata__ ignored
    assert [m.offset for m in metas] == sorted(m.offset for m in metas)
    for m in metas:
        t = tensors[m.name]
        assert m.file == str(file.resolve())
        assert m.dtype == str(t.dtype).removeprefix("torch.")
        assert m.shape == tuple(t.shape)
        assert m.length == t.numel() * t.element_size()
        assert same_bits(as_tensor(m), t)
    check_against_safetensors(metas)
    # No gaps: the tensors tile the data area exactly, which ends at the file's end.
    nonempty = [m for m in metas if m.length]
    assert nonempty[-1].offset + nonempty[-1].length == file.stat().st_size


@pytest.mark.skipif(not HAS_FP8, reason="torch lacks float8")
def test_fp8_header(tmp_path):
    t = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
    file = tmp_path / "fp8.safetensors"
    save_file({"w": t}, str(file))
    (meta,) = read_safetensors_header(file)
    assert meta.dtype == "float8_e4m3fn" and meta.length == 3
    check_against_safetensors([meta])


def test_header_reads_only_the_header(tmp_path, monkeypatch):
    file = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.ones(10, 10)}, str(file))
    calls = []
    real = os.pread
    monkeypatch.setattr(sh.os, "pread", lambda fd, n, off: calls.append((n, off)) or real(fd, n, off))
    metas = read_safetensors_header(file)
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    assert calls == [(8, 0), (n, 8)]
    assert min(m.offset for m in metas) == 8 + n


def test_hand_made_header_offsets_are_absolute(tmp_path):
    data = struct.pack("<4f", 1, 2, 3, 4) + struct.pack("<2q", 7, -7)
    header = {
        "__metadata__": {"k": "v"},
        "b": entry("I64", [2], 16, 32),
        "a": entry("F32", [2, 2], 0, 16),
    }
    file = write_raw(tmp_path / "h.safetensors", header, data)
    hlen = len(json.dumps(header).encode())
    a, b = read_safetensors_header(file)
    assert (a.name, a.offset, a.length, a.shape, a.dtype) == ("a", 8 + hlen, 16, (2, 2), "float32")
    assert (b.name, b.offset, b.length, b.shape, b.dtype) == ("b", 8 + hlen + 16, 16, (2,), "int64")
    assert as_tensor(b).tolist() == [7, -7]


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.uint8, torch.bool]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.dictionaries(
        st.text("abcdefgh._", min_size=1, max_size=8),
        st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), max_size=3)),
        min_size=1,
        max_size=6,
    )
)
def test_header_property_random_checkpoints(tmp_path, specs):
    tensors = {
        name: (torch.arange(max(1, torch.Size(shape).numel())) % 3)[: torch.Size(shape).numel()]
        .reshape(shape)
        .to(dtype)
        for name, (dtype, shape) in specs.items()
    }
    file = tmp_path / "p.safetensors"
    save_file(tensors, str(file))
    metas = read_safetensors_header(file)
    assert {m.name for m in metas} == set(tensors)
    check_against_safetensors(metas)


# ---------------------------------------------------------------- bad headers


def expect_error(file: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as ei:
        read_safetensors_header(file)
    msg = str(ei.value)
    for needle in (file.name, *needles):
        assert needle in msg, (needle, msg)
    return msg


def test_file_shorter_than_8_bytes(tmp_path):
    file = tmp_path / "short.safetensors"
    file.write_bytes(b"\x01\x02\x03")
    expect_error(file, "shorter than")


def test_empty_file(tmp_path):
    file = tmp_path / "empty.safetensors"
    file.write_bytes(b"")
    expect_error(file)


def test_header_length_past_end(tmp_path):
    file = write_raw(tmp_path / "trunc.safetensors", b'{"a": 1}', n=500)
    expect_error(file, "500")


def test_header_length_absurd(tmp_path):
    file = write_raw(tmp_path / "absurd.safetensors", b"{}", n=200_000_000)
    expect_error(file, "absurd")


def test_header_not_utf8(tmp_path):
    file = write_raw(tmp_path / "bin.safetensors", b'{"\xff\xfe": 1}')
    expect_error(file, "UTF-8")


def test_header_not_json(tmp_path):
    file = write_raw(tmp_path / "nojson.safetensors", b"{not json")
    expect_error(file, "JSON")


def test_header_not_object(tmp_path):
    file = write_raw(tmp_path / "list.safetensors", b"[1, 2]")
    expect_error(file, "not an object")


def test_header_duplicate_tensor_name(tmp_path):
    raw = b'{"w": {"dtype":"U8","shape":[1],"data_offsets":[0,1]}, "w": {"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    file = write_raw(tmp_path / "dup.safetensors", raw, b"\0\0")
    expect_error(file, "'w'")


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_entry_missing_key(tmp_path, missing):
    e = entry("F32", [2], 0, 8)
    del e[missing]
    file = write_raw(tmp_path / f"no_{missing}.safetensors", {"weight.x": e}, b"\0" * 8)
    expect_error(file, "weight.x", missing)


@pytest.mark.parametrize(
    "bad",
    [
        entry("F32", [-2], 0, 8),          # negative dim
        entry("F32", [2.0], 0, 8),         # float dim
        entry("F32", [True, 2], 0, 8),     # bool is no dim
        entry("F32", "2", 0, 8),           # shape not a list
        entry("F32", [2], 0.0, 8),         # float offset
        entry("F32", [2], -8, 0),          # negative offset
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]},
        {"dtype": "F32", "shape": [2], "data_offsets": "0-8"},
        {"dtype": 5, "shape": [2], "data_offsets": [0, 8]},
        [1, 2, 3],                          # entry not an object
    ],
    ids=["neg-dim", "float-dim", "bool-dim", "str-shape", "float-offset", "neg-offset",
         "three-offsets", "str-offsets", "int-dtype", "list-entry"],
)
def test_entry_wrong_types(tmp_path, bad):
    file = write_raw(tmp_path / "types.safetensors", {"layer.w": bad}, b"\0" * 8)
    expect_error(file, "layer.w")


def test_unknown_dtype(tmp_path):
    file = write_raw(tmp_path / "dt.safetensors", {"q.w": entry("F7", [1], 0, 1)}, b"\0")
    expect_error(file, "q.w", "'F7'", "unknown dtype")


def test_fp8_dtype_torch_lacks(tmp_path, monkeypatch):
    without = {k: v for k, v in sh.SAFETENSORS_DTYPES.items() if k != "F8_E4M3"}
    monkeypatch.setattr(sh, "SAFETENSORS_DTYPES", without)
    file = write_raw(tmp_path / "fp8.safetensors", {"k.w": entry("F8_E4M3", [2], 0, 2)}, b"\0\0")
    expect_error(file, "k.w", "F8_E4M3", "fp8", "torch")


def test_begin_after_end(tmp_path):
    file = write_raw(tmp_path / "rev.safetensors", {"r.w": entry("U8", [0], 4, 2)}, b"\0" * 4)
    expect_error(file, "r.w", "begin 4 > end 2")


def test_offsets_past_data_area(tmp_path):
    file = write_raw(tmp_path / "past.safetensors", {"p.w": entry("F32", [4], 0, 16)}, b"\0" * 12)
    expect_error(file, "p.w", "data area")


def test_overlapping_tensors(tmp_path):
    header = {"first.w": entry("F32", [2], 0, 8), "second.w": entry("F32", [2], 4, 12)}
    file = write_raw(tmp_path / "overlap.safetensors", header, b"\0" * 12)
    expect_error(file, "first.w", "second.w", "overlap")


def test_tensor_inside_another(tmp_path):
    header = {"big": entry("U8", [10], 0, 10), "mid": entry("U8", [2], 6, 8), "tail": entry("U8", [1], 9, 10)}
    file = write_raw(tmp_path / "nested.safetensors", header, b"\0" * 10)
    expect_error(file, "'big'", "overlap")


def test_empty_tensors_overlap_nothing(tmp_path):
    header = {"a": entry("U8", [2], 0, 2), "e1": entry("F32", [0], 1, 1), "e2": entry("F32", [0, 3], 2, 2)}
    file = write_raw(tmp_path / "empties.safetensors", header, b"\0\0")
    assert [m.name for m in read_safetensors_header(file)] == ["a", "e1", "e2"]


def test_size_mismatch(tmp_path):
    file = write_raw(tmp_path / "size.safetensors", {"m.w": entry("BF16", [3], 0, 8)}, b"\0" * 8)
    expect_error(file, "m.w", "6 bytes")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- index: good


def test_sharded_directory(tmp_path):
    ckpt, tensors = make_sharded(tmp_path)
    idx = index_checkpoint(ckpt)
    shards = sorted(str(p) for p in ckpt.glob("*.safetensors"))
    assert len(shards) >= 3
    assert idx.format == "safetensors" and idx.root == str(ckpt)
    assert idx.files == tuple(shards)
    assert idx.config == {"model_type": "llama"}
    assert set(idx.tensors) == set(tensors)
    assert idx.tensor_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    heads = [struct.unpack("<Q", Path(f).read_bytes()[:8])[0] + 8 for f in shards]
    assert idx.header_bytes == sum(heads)

    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    for name, meta in idx.tensors.items():
        assert Path(meta.file).name == weight_map[name]
        assert same_bits(as_tensor(meta), tensors[name])
    check_against_safetensors(list(idx.tensors.values()))
    # Ordered by file, then offset: the order read items want.
    order = [(m.file, m.offset) for m in idx.tensors.values()]
    assert order == sorted(order)


def test_index_metas_and_value_semantics(tmp_path):
    ckpt, _ = make_sharded(tmp_path)
    idx = index_checkpoint(ckpt)
    names = ["lm_head.weight", "model.embed_tokens.weight"]
    assert [m.name for m in idx.metas(names)] == names
    with pytest.raises(CheckpointError, match="no.such"):
        idx.metas(["no.such"])
    with pytest.raises(TypeError):
        idx.tensors["x"] = idx.tensors["lm_head.weight"]  # read-only
    again = index_checkpoint(str(ckpt) + "/")
    assert again == idx and hash(again) == hash(idx)
    assert isinstance(idx, CheckpointIndex)


def test_single_file_path(tmp_path):
    file = tmp_path / "only.safetensors"
    save_file(sample_tensors(), str(file))
    idx = index_checkpoint(file)
    assert idx.files == (str(file),) and idx.root == str(tmp_path) and idx.config is None
    assert idx.header_bytes == 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]
    check_against_safetensors(list(idx.tensors.values()))


def test_index_json_path(tmp_path):
    ckpt, tensors = make_sharded(tmp_path)
    idx = index_checkpoint(ckpt / "model.safetensors.index.json")
    assert set(idx.tensors) == set(tensors) and idx.root == str(ckpt)


def test_dir_with_model_safetensors(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "other.safetensors"))  # ignored: model.* wins
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    idx = index_checkpoint(tmp_path)
    assert idx.files == (str(tmp_path / "model.safetensors"),)
    assert list(idx.tensors) == ["a"] and idx.config == {"hidden_size": 8}


def test_dir_with_loose_safetensors(tmp_path):
    save_file({"b": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    save_file({"a": torch.ones(3)}, str(tmp_path / "a.safetensors"))
    idx = index_checkpoint(tmp_path)
    assert idx.files == (str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert set(idx.tensors) == {"a", "b"}


def test_safetensors_wins_over_bin(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert index_checkpoint(tmp_path).format == "safetensors"


def test_extra_tensor_not_in_weight_map_warns(tmp_path, caplog):
    ckpt, tensors = make_sharded(tmp_path)
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    stale = "model.layers.3.norm.weight"  # its shard stays in the index through other tensors
    del index["weight_map"][stale]
    index_file.write_text(json.dumps(index))
    with caplog.at_level("WARNING", logger="distload"):
        idx = index_checkpoint(ckpt)
    assert set(idx.tensors) == set(tensors) and stale in caplog.text


# ---------------------------------------------------------------- index: bad


def expect_index_error(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as ei:
        index_checkpoint(path)
    msg = str(ei.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


@pytest.mark.parametrize(
    "content", ["{broken", "[1]", '{"metadata": {}}', '{"weight_map": []}', '{"weight_map": {}}',
                '{"weight_map": {"a": 3}}'],
    ids=["bad-json", "not-object", "no-weight-map", "list-weight-map", "empty-weight-map", "int-shard"],
)
def test_index_malformed(tmp_path, content):
    (tmp_path / "model.safetensors.index.json").write_text(content)
    expect_index_error(tmp_path, "model.safetensors.index.json")


def test_index_shard_escapes_root(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x.safetensors"}}')
    expect_index_error(tmp_path, "model.safetensors.index.json", "../x.safetensors")


def test_index_names_missing_shard(tmp_path):
    ckpt, _ = make_sharded(tmp_path)
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    gone = "model-00002-of-" + Path(sorted(set(weight_map.values()))[0]).name.split("-of-")[1]
    (ckpt / gone).unlink()
    msg = expect_index_error(ckpt, gone, "does not exist")
    in_it = [n for n, s in weight_map.items() if s == gone]
    assert any(repr(n) in msg for n in in_it)


def test_index_maps_tensor_to_wrong_shard(tmp_path):
    ckpt, _ = make_sharded(tmp_path)
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    first, last = shards[0], next(s for s in shards[1:] if list(wm.values()).count(s) > 1)
    name = [n for n, s in wm.items() if s == last][0]  # `last` is still read: the tensor is there
    wm[name] = first
    index_file.write_text(json.dumps(index))
    expect_index_error(ckpt, name, first, "lacks it", last)


def test_index_maps_tensor_nobody_has(tmp_path):
    ckpt, _ = make_sharded(tmp_path)
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    index["weight_map"]["ghost.weight"] = shard
    index_file.write_text(json.dumps(index))
    expect_index_error(ckpt, "ghost.weight", shard)


def test_same_tensor_in_two_loose_files(tmp_path):
    save_file({"w": torch.ones(2), "a": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    expect_index_error(tmp_path, "'w'", "x.safetensors", "y.safetensors")


def test_same_tensor_in_two_indexed_shards(tmp_path):
    save_file({"w": torch.ones(2), "a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"w": torch.ones(2), "b": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    wm = {"w": "s1.safetensors", "a": "s1.safetensors", "b": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    expect_index_error(tmp_path, "'w'", "s1.safetensors", "s2.safetensors")


def test_bad_shard_header_names_that_shard(tmp_path):
    ckpt, _ = make_sharded(tmp_path)
    victim = sorted(ckpt.glob("*.safetensors"))[2]
    victim.write_bytes(victim.read_bytes()[:4])
    expect_index_error(ckpt, victim.name)


def test_empty_directory_lists_what_it_looked_for(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    expect_index_error(tmp_path, str(tmp_path), "model.safetensors.index.json", "model.safetensors",
                       "pytorch_model.bin")


def test_nonexistent_path(tmp_path):
    expect_index_error(tmp_path / "missing", "no such file or directory", "missing")


def test_not_a_checkpoint_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    expect_index_error(tmp_path / "notes.txt", "notes.txt")


def test_malformed_config(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{oops")
    expect_index_error(tmp_path, "config.json")


# ---------------------------------------------------------------- headers from bytes (a hub's range reads)


def test_header_from_bytes_is_the_files_header(tmp_path):
    """A remote header (its first bytes and the file's size) and the local file give the same metas."""
    ckpt, _ = make_sharded(tmp_path)
    for file in sorted(ckpt.glob("*.safetensors")):
        data, size = sh.read_header_bytes(str(file))
        assert size == file.stat().st_size and file.read_bytes().startswith(data)
        metas, header_size = sh.parse_safetensors_header(data, size, file=str(file))
        assert header_size == len(data)
        assert metas == read_safetensors_header(file)
        # more bytes than the header (a 100 kB range read of a small file) change nothing
        assert sh.parse_safetensors_header(file.read_bytes(), size, file=str(file))[0] == metas


def test_header_from_bytes_errors_name_the_file(tmp_path):
    ckpt, _ = make_sharded(tmp_path)
    file = sorted(ckpt.glob("*.safetensors"))[0]
    data, size = sh.read_header_bytes(str(file))
    with pytest.raises(CheckpointError, match=f"{file.name}: short read of header"):
        sh.parse_safetensors_header(data[:-5], size, file=str(file))
    with pytest.raises(CheckpointError, match=f"{file.name}: .*run past the data area"):
        sh.parse_safetensors_header(data, size - 1, file=str(file))   # the server's file is shorter
    with pytest.raises(CheckpointError, match="remote.safetensors: header length .* runs past the end"):
        sh.parse_safetensors_header(data, len(data) - 1, file="remote.safetensors")
    with pytest.raises(CheckpointError, match="shorter than the 8-byte"):
        sh.parse_safetensors_header(data[:5], size, file="remote.safetensors")


def test_index_from_headers_equals_the_local_index(tmp_path):
    ckpt, _ = make_sharded(tmp_path)
    local = index_checkpoint(ckpt)
    headers = {Path(f).name: sh.read_header_bytes(f) for f in local.files}
    weight_map = read_weight_map(str(ckpt / "model.safetensors.index.json"))
    remote = index_from_headers("/elsewhere/snapshot", headers, weight_map=weight_map, config=local.config)
    assert remote.relative() == local.relative()
    assert remote.header_bytes == local.header_bytes and remote.config == local.config
    assert remote.root == "/elsewhere/snapshot" and remote.files[0].startswith("/elsewhere/snapshot/")
    del headers[sorted(headers)[1]]
    with pytest.raises(CheckpointError, match="no header for this shard"):
        index_from_headers("/elsewhere", headers, weight_map=weight_map)


# ---------------------------------------------------------------- .bin checkpoints


class _Evil:
    """Unpickling this would run `_mark`: weights_only loading must never get that far."""

    def __reduce__(self):
        return (_mark, (os.environ.get("DISTLOAD_TEST_MARK", "/nonexistent/mark"),))


def _mark(path: str) -> None:
    Path(path).write_text("unpickled!")


def test_bin_single(tmp_path):
    state = {"w": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int32), "h": torch.ones(2).bfloat16()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    idx = index_checkpoint(tmp_path)
    assert idx.format == "bin" and idx.header_bytes == 0
    assert idx.files == (str(tmp_path / "pytorch_model.bin"),)
    for name, t in state.items():
        m = idx.tensors[name]
        assert (m.offset, m.length, m.shape, m.dtype) == (-1, t.numel() * t.element_size(), tuple(t.shape),
                                                          str(t.dtype).removeprefix("torch."))
    got = load_bin_tensors(tmp_path / "pytorch_model.bin", ["w", "h"])
    assert set(got) == {"w", "h"}
    assert same_bits(got["w"], state["w"]) and same_bits(got["h"], state["h"])
    assert idx.tensor_bytes == sum(t.numel() * t.element_size() for t in state.values())


def test_bin_sharded_with_index(tmp_path):
    torch.save({"a": torch.ones(3), "b": torch.zeros(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"c": torch.full((4,), 2.0)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    wm = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00001-of-00002.bin",
          "c": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    idx = index_checkpoint(tmp_path)
    assert idx.format == "bin" and len(idx.files) == 2 and set(idx.tensors) == {"a", "b", "c"}
    assert load_bin_tensors(idx.tensors["c"].file, ["c"])["c"].tolist() == [2.0] * 4
    assert [m.name for m in read_bin_metas(idx.files[0])] == ["a", "b"]


def test_bin_with_pickled_object_is_refused(tmp_path, monkeypatch):
    mark = tmp_path / "mark"
    monkeypatch.setenv("DISTLOAD_TEST_MARK", str(mark))
    torch.save({"w": torch.ones(2), "evil": _Evil()}, tmp_path / "pytorch_model.bin")
    msg = expect_index_error(tmp_path, "pytorch_model.bin", "arbitrary objects")
    assert "refus" in msg
    with pytest.raises(CheckpointError, match="arbitrary objects"):
        load_bin_tensors(tmp_path / "pytorch_model.bin", ["w"])
    assert not mark.exists()  # nothing was executed


def test_bin_with_non_tensor_value(tmp_path):
    torch.save({"w": torch.ones(2), "step": 7}, tmp_path / "pytorch_model.bin")
    expect_index_error(tmp_path, "pytorch_model.bin", "'step'")


def test_bin_not_a_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "pytorch_model.bin")
    expect_index_error(tmp_path, "pytorch_model.bin", "state dict")


def test_bin_legacy_or_garbage(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    expect_index_error(tmp_path / "old.bin", "old.bin", "zip")
    (tmp_path / "junk.bin").write_bytes(b"not a torch file at all")
    expect_index_error(tmp_path / "junk.bin", "junk.bin")


def test_load_bin_tensors_unknown_name(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*'nope'"):
        load_bin_tensors(tmp_path / "pytorch_model.bin", ["nope"])


def test_bin_index_missing_shard(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "p1.bin")
    wm = {"a": "p1.bin", "z": "p2.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    expect_index_error(tmp_path, "p2.bin", "'z'")
