"""Memory budgets and run reserves: pure parsing and arithmetic, hand-checked numbers."""

import copy

import pytest
import torch

from distload.cli.config import parse_args
from distload.meta.describe import ModelSpec, ParamSpec, UnitSpec, describe_model
from distload.meta import init_empty_weights
from distload.models import build_model
from distload.plan import budget
from distload.loader.memory import measure_local
from distload.plan.budget import (LocalMemory, RankBudget, device_margin, format_bytes,
                                  parse_max_memory, parse_max_memory_arg, parse_size, resolve_budgets)
from distload.plan.reserve import RunShape, UnitReserve, run_shape, stage_reserve, unit_reserves

from .conftest import tiny_config

GiB, MiB = 2**30, 2**20


@pytest.mark.parametrize("value,expected", [
    (0, 0), (1024, 1024), ("1024", 1024), ("1024B", 1024), ("1024 b", 1024),
    ("20GB", 20 * 10**9), ("20GiB", 20 * GiB), ("512MiB", 512 * MiB), ("512MB", 512 * 10**6),
    ("20gb", 20 * 10**9), ("20gib", 20 * GiB), ("20Gb", 20 * 10**9),   # never bits
    ("1.5GiB", 3 * GiB // 2), ("1.5GB", 1_500_000_000), (".5KiB", 512), ("2.KB", 2000),
    ("1TB", 10**12), ("1TiB", 2**40), ("3kb", 3000), ("3KiB", 3072), (" 7 MiB ", 7 * MiB),
    ("0.000000001GB", 1), ("1PB", 10**15),
])
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value,message", [
    ("20G", r"ambiguous: write 20GB \(10\^9 bytes\) or 20GiB \(2\^30 bytes\)"),
    ("512m", r"ambiguous: write 512MB .* or 512MiB"),
    ("1.5T", "ambiguous"), ("3k", "ambiguous"),
    ("20GX", "unknown unit"), ("20 bits", "unknown unit"),
    ("", "not a number"), ("GB", "not a number"), ("-5GB", "not a number"), ("1e9", "not a number"),
    (-1, "negative"), (1.5, "must be an int"), (True, "must be an int"), (None, "must be an int"),
])
def test_parse_size_errors(value, message):
    with pytest.raises(ValueError, match=message):
        parse_size(value)


def test_parse_max_memory_keys_and_no_mutation():
    given = {0: "20GiB", "cuda:1": "1GB", "2": 5, "CPU": "64GiB", "disk": "1TB"}
    before = copy.deepcopy(given)
    out = parse_max_memory(given)
    assert given == before                                    # the user's dict is untouched
    assert out == {0: 20 * GiB, 1: 10**9, 2: 5, "cpu": 64 * GiB, "disk": 10**12}
    assert parse_max_memory(None) == {}


@pytest.mark.parametrize("given,message", [
    ({"mps": "1GB"}, "not a device"), ({-1: "1GB"}, "negative"), ({0: "1GB", "cuda:0": "2GB"}, "twice"),
    ({0: "20G"}, r"max_memory\[0\]: .*ambiguous"), ([("cpu", 1)], "must be a dict"), ({True: 1}, "not a device"),
])
def test_parse_max_memory_errors(given, message):
    with pytest.raises(ValueError, match=message):
        parse_max_memory(given)


def test_parse_max_memory_arg_forms():
    assert parse_max_memory_arg("0=20GiB,1=1GB,cpu=64GiB,disk=1TB") == {
        0: 20 * GiB, 1: 10**9, "cpu": 64 * GiB, "disk": 10**12}
    assert parse_max_memory_arg('{"0": "20GiB", "cpu": 1000}') == {0: 20 * GiB, "cpu": 1000}
    assert parse_max_memory_arg(None) == {} and parse_max_memory_arg(" ") == {}
    with pytest.raises(ValueError, match="KEY=SIZE"):
        parse_max_memory_arg("0:20GiB")
    with pytest.raises(ValueError, match="JSON"):
        parse_max_memory_arg("{0: 1}")


def test_cli_rejects_ambiguous_size(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--max-memory", "0=20G"])
    assert "20GiB" in capsys.readouterr().err
    cfg = parse_args(["--max-memory", "0=1GB", "--max-batch-size", "4", "--max-seq-len", "128", "--explain"])
    assert (cfg.max_memory, cfg.max_batch_size, cfg.max_seq_len, cfg.explain) == ("0=1GB", 4, 128, True)


def test_format_bytes():
    assert [format_bytes(x) for x in (None, 5, 1536, 3 * GiB)] == ["unlimited", "5 B", "1.5 KiB", "3.0 GiB"]


def test_resolve_budgets_defaults_on_gpus():
    m = LocalMemory("cuda", 10 * GiB, 100 * GiB, disk_free=1000 * GiB, local_world_size=2)
    b0, b1 = resolve_budgets({}, [m, m])
    assert b0.device == 10 * GiB - device_margin(10 * GiB) == 10 * GiB - 512 * MiB
    assert b0.cpu == int(100 * GiB * budget.HOST_FRACTION) // 2         # host shared by the node's ranks
    assert b0.disk == 500 * GiB and b1 == b0
    assert "free GPU memory" in b0.source and "/ 2 ranks" in b0.source


def test_resolve_budgets_user_values_win():
    m = LocalMemory("cuda", 10 * GiB, 100 * GiB, None, 2)
    b0, b1 = resolve_budgets({1: 3 * GiB, "cpu": 8 * GiB, "disk": 2 * GiB}, [m, m])
    assert b1 == RankBudget(3 * GiB, 4 * GiB, GiB, b1.source, pinned=True) and "max_memory[1]" in b1.source
    assert b0.device == 10 * GiB - device_margin(10 * GiB) and b0.cpu == 4 * GiB


def test_resolve_budgets_cpu_device_has_no_separate_cpu_tier():
    m = LocalMemory("cpu", None, 8 * GiB, None, 1)
    (b,) = resolve_budgets({"cpu": 4 * GiB}, [m])
    assert (b.device, b.cpu, b.disk) == (4 * GiB, 0, None)
    (b,) = resolve_budgets({0: GiB, "cpu": 4 * GiB}, [m])         # explicit: both tiers
    assert (b.device, b.cpu) == (GiB, 4 * GiB)


def test_resolve_budgets_per_node_from_each_ranks_measure():
    """Two nodes of unequal size and RAM: each rank's host and disk budgets are its own node's, shared by
    that node's ranks (what each rank measured: its node's RAM and disk, its node's rank count)."""
    big = LocalMemory("cuda", 10 * GiB, 64 * GiB, disk_free=900 * GiB, local_world_size=1)
    small = LocalMemory("cuda", 10 * GiB, 32 * GiB, disk_free=300 * GiB, local_world_size=3)
    b = resolve_budgets({}, [big, small, small, small])
    assert b[0].cpu == int(64 * GiB * budget.HOST_FRACTION) and b[0].disk == 900 * GiB
    assert [x.cpu for x in b[1:]] == [int(32 * GiB * budget.HOST_FRACTION) // 3] * 3
    assert [x.disk for x in b[1:]] == [100 * GiB] * 3 and "/ 3 ranks" in b[1].source
    b = resolve_budgets({"cpu": 12 * GiB, "disk": 30 * GiB}, [big, small, small, small])
    assert [(x.cpu, x.disk) for x in b] == [(12 * GiB, 30 * GiB)] + [(4 * GiB, 10 * GiB)] * 3


def test_resolve_budgets_rejects_ranks_outside_the_world():
    with pytest.raises(ValueError, match=r"device\(s\) \[2\].*2 rank"):
        resolve_budgets({2: 1}, [LocalMemory("cpu", None, GiB)] * 2)


def test_device_margin():
    assert device_margin(100 * GiB) == 5 * GiB and device_margin(GiB) == 256 * MiB
    assert device_margin(100 * MiB) == 100 * MiB


def test_measure_local_queries_only_its_own_gpu(monkeypatch, tmp_path):
    asked = []

    def fake_mem_get_info(device=None):
        asked.append(device)
        return (7 * GiB, 8 * GiB)

    monkeypatch.setattr(torch.cuda, "mem_get_info", fake_mem_get_info)
    m = measure_local(torch.device("cuda", 3), offload_dir=str(tmp_path / "not" / "yet"), local_world_size=4)
    assert asked == [torch.device("cuda", 3)]
    assert (m.device_type, m.device_free, m.local_world_size) == ("cuda", 7 * GiB, 4)
    assert m.host_available > 0 and m.disk_free > 0           # the nearest existing parent's disk
    cpu = measure_local("cpu")
    assert cpu.device_free is None and asked == [torch.device("cuda", 3)]


def test_run_shape_defaults_and_limits():
    assert run_shape({"max_position_embeddings": 512}) == RunShape(1, 512)
    assert run_shape({}) == RunShape(1, 2048)
    assert run_shape({"max_position_embeddings": 8192}, max_batch_size=4, max_seq_len=100) == RunShape(4, 100)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        run_shape({"max_position_embeddings": 64}, max_seq_len=65)
    with pytest.raises(ValueError, match="at least 1"):
        run_shape({}, max_batch_size=0)
    # GPT-2-style configs name it n_positions (GPT-2, GPTBigCode): the same cap
    assert run_shape({"n_positions": 64}) == RunShape(1, 64)
    with pytest.raises(ValueError, match="exceeds"):
        run_shape({"n_positions": 64}, max_seq_len=65)


def test_the_kv_fallback_reads_gpt2_style_names():
    """A unit naming no k/v projections (transformers' GPT-2 blocks, Conv1D) takes its KV
    size from the config, under GPT-2's names too."""
    from distload.plan.reserve import _config_kv_per_token

    assert _config_kv_per_token({"n_head": 4, "n_embd": 64}) == _config_kv_per_token(
        {"num_attention_heads": 4, "hidden_size": 64}) == 128


def test_unit_reserves_of_a_llama():
    cfg = tiny_config()            # hidden 64, 4 heads, 2 kv heads (head_dim 16), inter 128, vocab 256
    with init_empty_weights():
        spec = describe_model(build_model(cfg))
    res = unit_reserves(spec, RunShape(2, 10), itemsize=2, config=cfg)
    names = [u.name for u in spec.units]
    layer = res[names.index("model.layers.0")]
    assert layer.kv_bytes == 2 * 10 * (2 * 2 * 16) * 2                 # tokens * (k + v) * itemsize
    # widest input 128 + q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 64; widest output
    # 128 once more in float32
    assert layer.work_bytes == 20 * ((128 + 64 + 32 + 32 + 64 + 128 + 128 + 64) * 2 + 128 * 4)
    head = res[names.index("lm_head")]
    assert head.kv_bytes == 0 and head.work_bytes == 20 * ((64 + 256) * 2 + 256 * 4)   # logits
    assert res[names.index("model.embed_tokens")].work_bytes == 20 * (64 * 2 + 64 * 4)
    assert all(r == UnitReserve() for r in unit_reserves(spec, None, itemsize=2))


def test_reserves_per_workload():
    cfg = tiny_config()            # hidden 64, vocab 256
    with init_empty_weights():
        spec = describe_model(build_model(cfg))
    assert spec.head == "lm_head"
    names = [u.name for u in spec.units]
    shape = dict(max_batch_size=2, max_seq_len=10)
    anything = unit_reserves(spec, RunShape(**shape), itemsize=2, config=cfg)
    forward = unit_reserves(spec, RunShape(**shape, workload="forward"), itemsize=2, config=cfg)
    generate = unit_reserves(spec, RunShape(**shape, workload="generate"), itemsize=2, config=cfg)
    head, layer = names.index("lm_head"), names.index("model.layers.0")
    assert forward[layer].kv_bytes == 0 and generate[layer].kv_bytes == anything[layer].kv_bytes > 0
    assert forward[head].work_bytes == anything[head].work_bytes == 20 * ((64 + 256) * 2 + 256 * 4)
    # generation: the head reads all 20 positions but makes logits for 2 rows only
    assert generate[head].work_bytes == 20 * 64 * 2 + 2 * (256 * 2 + 256 * 4)
    assert generate[layer].work_bytes == anything[layer].work_bytes
    assert run_shape({}, workload="generate").workload == "generate"
    with pytest.raises(ValueError, match="workload 'train'"):
        RunShape(1, 1, "train")


def test_kv_from_config_when_no_projections_are_named():
    spec = ModelSpec(units=(UnitSpec("blocks.0", (ParamSpec("blocks.0.w", (4, 4)),), 32.0, kind="Block"),),
                     tied=(), no_split_classes=("Block",))
    cfg = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64}
    (r,) = unit_reserves(spec, RunShape(1, 5), itemsize=4, config=cfg)
    assert r.kv_bytes == 5 * 2 * 2 * 8 * 4


def test_stage_reserve_sums_kv_and_takes_largest_work():
    assert stage_reserve([UnitReserve(10, 5), UnitReserve(10, 7)]) == 27
    assert stage_reserve([]) == 0
