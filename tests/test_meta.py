"""Meta-device construction, module sizes, tied groups, materializing, and the demo
checkpoint made once under concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from distload.sources.demo import DEMO_CONFIG, ensure_demo_checkpoint
from distload.meta import (
    find_tied_parameters, init_empty_weights, init_on_device, materialize, module_sizes,
)
from distload.models import build_model

TINY = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "tie_word_embeddings": True}
ORIGINALS = (nn.Module.register_parameter, nn.Module.register_buffer, torch.empty, torch.zeros,
             *(getattr(nn.init, n) for n in dir(nn.init) if not n.startswith("_")))


def _patched() -> tuple:
    return (nn.Module.register_parameter, nn.Module.register_buffer, torch.empty, torch.zeros,
            *(getattr(nn.init, n) for n in dir(nn.init) if not n.startswith("_")))


def _left_behind() -> list:
    """Registration hooks and torch-function modes still installed."""
    from torch.nn.modules import module
    from torch.overrides import _get_current_function_mode_stack
    return [*module._global_parameter_registration_hooks.values(),
            *module._global_buffer_registration_hooks.values(), *_get_current_function_mode_stack()]


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("stat", torch.ones(3))
        self.register_buffer("scratch", torch.ones(5), persistent=False)


def test_init_empty_weights_puts_parameters_on_meta() -> None:
    with init_empty_weights():
        m = WithBuffers()
    assert all(p.is_meta for p in m.parameters())
    assert not m.stat.is_meta  # buffers stay real unless asked
    with init_empty_weights(include_buffers=True):
        m = WithBuffers()
    assert all(t.is_meta for t in [*m.parameters(), *m.buffers()])
    assert _patched() == ORIGINALS
    assert torch.empty(1).device.type == "cpu"


def test_nothing_is_patched_and_nothing_outlives_the_block() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with init_empty_weights(include_buffers=True):
            assert _patched() == ORIGINALS    # nothing another library could capture
            assert _left_behind()
            raise RuntimeError("boom")
    assert _patched() == ORIGINALS and not _left_behind()
    assert not nn.Linear(2, 2).weight.is_meta
    assert torch.empty(1).device.type == "cpu"


def test_nested_contexts_innermost_wins_and_unwinds() -> None:
    with init_on_device("cpu"):
        with init_empty_weights():
            assert nn.Linear(2, 2).weight.is_meta
        assert nn.Linear(2, 2).weight.device.type == "cpu"
        with pytest.raises(ValueError):
            with init_empty_weights():
                raise ValueError
        assert not nn.Linear(2, 2).weight.is_meta
    assert _patched() == ORIGINALS


def test_tied_parameters_stay_tied_under_init_empty_weights() -> None:
    with init_empty_weights():
        model = build_model(TINY)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.is_meta


def test_module_sizes_counts_tied_once() -> None:
    with init_empty_weights():
        model = build_model(TINY)
    sizes = module_sizes(model)
    embed = 32 * 16 * 4
    assert sizes["model.embed_tokens"] == embed
    assert sizes["lm_head"] == embed
    unique = sum(p.numel() for p in set(model.parameters())) * 4
    assert sizes[""] == unique == sum(p.numel() * 4 for p in model.parameters())
    assert sizes[""] == sizes["model"] + sizes["lm_head"] - embed
    assert sizes["model.layers"] == sizes["model.layers.0"] + sizes["model.layers.1"]
    assert sizes["model.rotary_emb"] == 0  # inv_freq is not persistent
    half = module_sizes(model, dtype=torch.bfloat16)
    assert half[""] * 2 == sizes[""]


def test_module_sizes_counts_persistent_buffers_and_keeps_int_dtypes() -> None:
    m = WithBuffers()
    m.register_buffer("count", torch.zeros(7, dtype=torch.int64))
    sizes = module_sizes(m, dtype=torch.float16)
    assert sizes["linear"] == (12 + 3) * 2
    assert sizes[""] == (12 + 3 + 3) * 2 + 7 * 8  # no `scratch`, `count` stays int64


def test_find_tied_parameters() -> None:
    with init_empty_weights():
        model = build_model(TINY)
        untied = build_model({**TINY, "tie_word_embeddings": False})
    assert find_tied_parameters(model) == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert find_tied_parameters(untied) == []
    seq = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    seq[2].weight = seq[0].weight
    seq[1].bias = seq[0].bias
    assert find_tied_parameters(seq) == [["0.bias", "1.bias"], ["0.weight", "2.weight"]]


def test_materialize_keeps_ties_and_initializes_buffers() -> None:
    with torch.device("meta"):
        model = build_model(TINY)
    del model.model.layers["1"]
    real = model.model.norm.weight = nn.Parameter(torch.full((16,), 3.0))  # already loaded
    out = materialize(model, "cpu")
    assert out is model
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.norm.weight is real
    inv = model.model.rotary_emb.inv_freq
    torch.testing.assert_close(inv, 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8))


def _make_demo(cache_dir: str, barrier, results) -> None:
    barrier.wait()  # both processes race for it
    results.put(str(ensure_demo_checkpoint(cache_dir)))


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_demo_checkpoint_made_once_by_concurrent_processes(tmp_path, monkeypatch) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_make_demo, args=(str(tmp_path), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    paths = {results.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(paths) == 1
    path = Path(paths.pop())
    assert [d.name for d in tmp_path.iterdir() if d.is_dir()] == [path.name]
    assert path.name.startswith("demo-")

    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) >= 3
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard.name
                t = f.get_slice(name)
                total += torch.Size(t.get_shape()).numel() * 4
    assert total == index["metadata"]["total_size"]
    assert 120e6 <= total <= 160e6
    assert json.loads((path / "config.json").read_text()) == DEMO_CONFIG

    before = _snapshot(tmp_path)
    monkeypatch.setenv("DISTLOAD_CACHE", str(tmp_path))
    assert ensure_demo_checkpoint() == path
    assert _snapshot(tmp_path) == before


def test_a_model_loaded_after_the_block_equals_a_fresh_load(tmp_path) -> None:
    """transformers copies `torch.nn.init` functions when its modeling code is first
    imported: imported inside the block, it must copy the real ones (the buffers of a
    model loaded later in the process, e.g. BERT's token_type_ids, are initialised by them)."""
    import subprocess
    import sys

    worker = Path(__file__).parent / "workers" / "init_leak.py"
    outs = {}
    for mode in ("fresh", "leak"):
        outs[mode] = tmp_path / f"{mode}.pt"
        run = subprocess.run([sys.executable, str(worker), mode, str(tmp_path / "bert"), str(outs[mode])],
                             capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-2000:]
    fresh, leak = (torch.load(outs[m]) for m in ("fresh", "leak"))
    assert fresh.keys() == leak.keys() and "embeddings.token_type_ids" in fresh
    for name in fresh:
        assert torch.equal(fresh[name], leak[name]), name
