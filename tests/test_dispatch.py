"""The accelerate workflow with only its import line changed, against transformers' own
`from_pretrained` model; and `infer_auto_device_map` against accelerate's."""

import copy
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distload import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from distload.sources.demo import make_checkpoint
from distload.meta.describe import describe_model
from distload.compat.accelerate.device_map import plan_device_map
from distload.compat.accelerate.dispatch import device_for
from distload.errors import LoadError

from .conftest import tiny_config
from .mp import torchrun, worker

IDS = torch.tensor([[1, 5, 9, 200, 3, 7], [4, 4, 8, 15, 16, 23]])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch")
    out = {}
    for name, cfg, dtype in (("untied", tiny_config(), "float32"),
                             ("tied", tiny_config(tie_word_embeddings=True), "float32"),
                             ("bf16", tiny_config(torch_dtype="bfloat16"), "bfloat16")):
        out[name] = root / name
        make_checkpoint(cfg, out[name], num_shards=2, dtype=dtype, seed=3)
    return out


def _meta_model(path):
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def _reference(path, **kw):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, **kw)(IDS).logits


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_accelerate_workflow_equals_transformers(ckpts, name):
    path = ckpts[name]
    model = _meta_model(path)
    max_memory = {"cpu": "2GiB"}
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["LlamaDecoderLayer"])
    assert device_map == {"": "cpu"} and max_memory == {"cpu": "2GiB"}
    model = load_checkpoint_and_dispatch(model, checkpoint=path, device_map=device_map)
    assert model.hf_device_map == {"": "cpu"}
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(_logits(model), _reference(path, dtype=torch.float32))
    if name == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dtype_cast_equals_transformers_in_bfloat16(ckpts):
    path = ckpts["bf16"]
    model = load_checkpoint_and_dispatch(_meta_model(path), path, device_map="auto", dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(model), _reference(path, dtype=torch.bfloat16))


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_cpu_and_disk_tiers_equal_transformers(ckpts, name, tmp_path):
    path = ckpts[name]
    model = _meta_model(path)
    from accelerate import infer_auto_device_map as accelerate_map

    device_map = infer_auto_device_map(model, max_memory={"cpu": 600_000})
    assert {"cpu", "disk"} == set(device_map.values())
    assert device_map == accelerate_map(model, max_memory={"cpu": 600_000})   # one process: accelerate's
    model = load_checkpoint_and_dispatch(model, path, device_map=device_map, offload_folder=tmp_path / "off")
    assert torch.equal(_logits(model), _reference(path, dtype=torch.float32))
    assert any((tmp_path / "off").rglob("*"))                        # disk entries in the offload store
    assert torch.equal(_logits(model), _reference(path, dtype=torch.float32))   # and again


def test_device_map_covers_every_module_in_order(ckpts):
    """distload's planner (under torchrun, or with a run shape): every unit, in order."""
    model = _meta_model(ckpts["untied"])
    full = infer_auto_device_map(model, max_memory={"cpu": "1GB"}, clean_result=False, max_seq_len=64)
    assert list(full) == ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm",
                          "model.rotary_emb", "lm_head"]
    for name, _ in model.named_parameters():
        device_for(name, full)                                     # every parameter is placed


@pytest.mark.parametrize("share", [0.3, 0.6, 1.2])
@pytest.mark.parametrize("no_split", [None, ["LlamaDecoderLayer"]])
def test_one_process_maps_are_accelerates(ckpts, share, no_split):
    """One process runs its devices one after the other: the map is accelerate's (the
    first GPU filled first), whatever the budgets; distload's own planner still splits by
    cost, its slowest stage no slower than accelerate's."""
    from accelerate import infer_auto_device_map as accelerate_map

    cfg = AutoConfig.from_pretrained(ckpts["untied"])
    cfg.vocab_size, cfg.num_hidden_layers = 8192, 8            # a large vocabulary: a costly head
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() * 4 for p in model.parameters())
    budget = {**{i: int(total * share) for i in range(3)}, "cpu": int(total * share)}
    for kw in ({}, {"clean_result": False}, {"dtype": torch.float16}, {"fallback_allocation": True}):
        ours = infer_auto_device_map(model, dict(budget), no_split, **kw)
        assert ours == accelerate_map(model, max_memory=dict(budget), no_split_module_classes=no_split, **kw), kw
    if share == 0.6 and no_split:
        spec = describe_model(model)
        plan = plan_device_map(model, dict(budget))
        theirs = accelerate_map(model, max_memory=dict(budget), no_split_module_classes=no_split)
        costs = [0.0, 0.0, 0.0]
        for unit in spec.units:
            costs[device_for(unit.name, theirs)[1]] += unit.cost
        assert plan.partition.bottleneck <= max(costs)


def test_errors_name_the_problem(ckpts):
    path = ckpts["untied"]
    with pytest.raises(ValueError, match="device_map 'everywhere'"):
        load_checkpoint_and_dispatch(_meta_model(path), path, device_map="everywhere")
    with pytest.raises(LoadError, match=r"lm_head\.weight"):
        load_checkpoint_and_dispatch(_meta_model(path), path, device_map={"model": "cpu"})
    with pytest.raises(ValueError, match="ambiguous"):
        infer_auto_device_map(_meta_model(path), max_memory={"cpu": "2G"})


def test_max_memory_is_never_mutated(ckpts):
    max_memory = {0: "1GiB", "cpu": "2GiB"}
    before = copy.deepcopy(max_memory)
    infer_auto_device_map(_meta_model(ckpts["untied"]), max_memory=max_memory)
    assert max_memory == before


@pytest.mark.multiprocess
def test_auto_under_torchrun_loads_only_this_ranks_stage(ckpts, tmp_path):
    proc = torchrun(2, [worker("plan_dispatch.py"), str(ckpts["untied"]), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["digest"] == results[1]["digest"]
    assert results[0]["units"][0] == "model.embed_tokens" and results[1]["units"][-1] == "lm_head"
    assert not set(results[0]["units"]) & set(results[1]["units"])
    assert all(r["mismatches"] == [] and r["checked"] > 0 for r in results)
    logits = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(logits, _reference(ckpts["untied"], dtype=torch.float32), atol=1e-5, rtol=0)


class _Stats(torch.nn.Module):
    """BatchNorm statistics (buffers, an int64 among them) and parameters on the root."""

    def __init__(self):
        super().__init__()
        self.linear1 = torch.nn.Linear(3, 4)
        self.batchnorm = torch.nn.BatchNorm1d(4)
        self.linear2 = torch.nn.Linear(4, 5)
        self.scale = torch.nn.Parameter(torch.rand(5))
        self.register_buffer("shift", torch.zeros(5))

    def forward(self, x):
        return self.linear2(self.batchnorm(self.linear1(x))) * self.scale + self.shift


def _stats_checkpoint(tmp_path, fmt):
    torch.manual_seed(5)
    model = _Stats().train()
    model(torch.randn(16, 3))                 # running statistics away from their init
    with torch.no_grad():
        model.shift.add_(0.25)
    model.eval()
    sd = model.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "model.safetensors"
        save_file(sd, path)
    else:
        path = tmp_path / "stats.pt"
        torch.save(sd, path)
    ref = _Stats().eval()
    ref.load_state_dict(torch.load(path) if fmt != "safetensors" else __import__(
        "safetensors.torch", fromlist=["load_file"]).load_file(path))
    return path, ref


_BUILDS = {"built": lambda: _Stats(), "empty": lambda: _empty(False), "empty_buffers": lambda: _empty(True)}


def _empty(include_buffers):
    with init_empty_weights(include_buffers=include_buffers):
        return _Stats()


@pytest.mark.parametrize("api", ["load_checkpoint_in_model", "load_checkpoint_and_dispatch"])
@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("build", sorted(_BUILDS))
def test_every_buffer_and_root_parameter_is_loaded(tmp_path, api, tier, build):
    """Whatever API, tier, and however the model was built, every key naming a parameter
    or a persistent buffer ends up as `load_state_dict` puts it."""
    from distload import load_checkpoint_in_model

    path, ref = _stats_checkpoint(tmp_path, "torch" if tier == "cpu" else "safetensors")
    model = _BUILDS[build]()
    device_map = {"linear1": "cpu", "batchnorm": tier, "linear2": tier, "scale": "cpu", "shift": "cpu"}
    if api == "load_checkpoint_in_model":
        load_checkpoint_in_model(model, path, device_map=device_map, offload_folder=tmp_path / "off")
    else:
        model = load_checkpoint_and_dispatch(model, path, device_map=device_map, offload_folder=tmp_path / "off",
                                             force_hooks=True)   # hooks also for keys naming parameters
    model.eval()
    x = torch.randn(7, 3)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    want = ref.state_dict()
    for name, buf in model.named_buffers():
        assert torch.equal(buf, want[name]) and buf.dtype == want[name].dtype, name
    if tier == "cpu":
        for name, p in model.named_parameters():
            assert torch.equal(p, want[name]), name


def test_unexpected_keys_use_accelerates_words_and_strict_raises(tmp_path, caplog):
    from distload import load_checkpoint_in_model

    path, _ = _stats_checkpoint(tmp_path, "torch")
    sd = torch.load(path)
    sd["foo"] = torch.ones(2)
    torch.save(sd, path)
    with caplog.at_level("WARNING"):
        load_checkpoint_in_model(_Stats(), path)
    assert "were not used when initializing _Stats: ['foo']" in caplog.text
    assert "batchnorm" not in caplog.text     # buffers are used keys
    with pytest.raises(LoadError, match="foo"):
        load_checkpoint_in_model(_Stats(), path, strict=True)


@pytest.mark.parametrize("form", ["flat_index_folder", "flat_index_file", "nested_index_file", "pth"])
def test_checkpoint_forms_accelerate_takes(tmp_path, form):
    """Any *.index.json (flat {name: file} or {"weight_map": ...}, shards of any name, the
    folder holding it) and torch files of any suffix, as accelerate takes them."""
    from distload import load_checkpoint_in_model

    path, ref = _stats_checkpoint(tmp_path, "torch")
    sd = torch.load(path)
    path.unlink()
    if form == "pth":
        target = tmp_path / "weights.pth"
        torch.save(sd, target)
    else:
        weight_map = {k: f"part_{k.split('.')[0]}.bin" for k in sd}
        for shard in set(weight_map.values()):
            torch.save({k: v for k, v in sd.items() if weight_map[k] == shard}, tmp_path / shard)
        body = {"weight_map": weight_map} if form.startswith("nested") else weight_map
        (tmp_path / "weight_map.index.json").write_text(json.dumps(body))
        target = tmp_path if form.endswith("folder") else tmp_path / "weight_map.index.json"
    model = _empty(False)
    load_checkpoint_in_model(model, target)
    want = ref.state_dict()
    assert model.state_dict().keys() == want.keys()
    for name, t in model.state_dict().items():
        assert torch.equal(t, want[name]), name


_HUB_CLIENT = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from distload import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
repo, local, out = sys.argv[1:4]
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(local))
device_map = infer_auto_device_map(model, max_memory={"cpu": 600_000})
model = load_checkpoint_and_dispatch(model, repo, device_map=device_map)
with torch.no_grad():
    torch.save(model(torch.tensor(eval(sys.argv[4]))).logits, out)
"""


def test_a_hub_id_reaches_load_checkpoint_and_dispatch(ckpts, tmp_path):
    """One loading path: the sources `distload.load` has (here the hub, through the real
    huggingface_hub client against tests/fakehub.py) serve accelerate's workflow too."""
    from .fakehub import run_client

    path = ckpts["untied"]
    run = run_client(_HUB_CLIENT, ["acme/tiny", str(path), str(tmp_path / "out.pt"), str(IDS.tolist())],
                     "acme/tiny", path, tmp_path / "home", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), _reference(path, dtype=torch.float32))


@pytest.mark.parametrize("how", ["dispatch_model", "disk_offload"])
def test_dispatch_model_and_disk_offload_keep_the_outputs(tmp_path, how):
    """A model in memory, placed as accelerate's `dispatch_model` / `disk_offload` do:
    the same outputs, the disk part streamed from the offload store; accelerate's own
    `remove_hook_from_submodules` undoes it, and it can be dispatched again."""
    from accelerate.hooks import remove_hook_from_submodules

    from distload import disk_offload, dispatch_model
    from distload.offload import streamer_of

    _, ref = _stats_checkpoint(tmp_path, "torch")
    model = copy.deepcopy(ref)
    x = torch.randn(6, 3)
    for round_ in range(2):
        if how == "dispatch_model":
            dispatch_model(model, {"linear1": "cpu", "batchnorm": "disk", "linear2": "disk", "scale": "cpu",
                                   "shift": "cpu"}, offload_dir=tmp_path / f"off{round_}")
        else:
            disk_offload(model, tmp_path / f"off{round_}")
        assert model.linear2.weight.is_meta and streamer_of(model) is not None
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        remove_hook_from_submodules(model)
        assert streamer_of(model) is None and not model.linear2.weight.is_meta
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_nothing_fits_streams_from_disk_with_one_warning(tmp_path, caplog):
    """A budget smaller than any module: accelerate's map (everything on disk), one
    warning saying by how much, and the model runs, streamed."""
    path, ref = _stats_checkpoint(tmp_path, "safetensors")
    model = _empty(False)
    with caplog.at_level("WARNING", logger="distload"):
        device_map = infer_auto_device_map(model, max_memory={"cpu": 40})
    assert set(device_map.values()) == {"disk"}
    assert "insufficient memory" in caplog.text and "over)" in caplog.text
    model = load_checkpoint_and_dispatch(model, path, device_map=device_map, offload_folder=tmp_path / "off")
    x = torch.randn(3, 3)
    torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_cpu_offload_keeps_the_outputs(tmp_path, offload_buffers):
    """accelerate's `cpu_offload`: the weights (and with `offload_buffers` the buffers)
    wait in host memory, on meta in the model between uses, and each module's come in when
    it runs: the outputs equal the model's before offload, `get_state_dict_offloaded_model`
    its state dict; accelerate's own `remove_hook_from_submodules` undoes it."""
    from accelerate.hooks import remove_hook_from_submodules

    from distload import cpu_offload
    from distload.compat.accelerate import get_state_dict_offloaded_model
    from distload.offload import streamer_of

    _, ref = _stats_checkpoint(tmp_path, "torch")
    model = copy.deepcopy(ref)
    assert cpu_offload(model, execution_device="cpu", offload_buffers=offload_buffers) is model
    assert not hasattr(model, "hf_device_map")   # accelerate's cpu_offload sets none
    assert model.linear1.weight.is_meta and model.linear2.bias.is_meta and not model.scale.is_meta
    assert model.batchnorm.running_mean.is_meta == offload_buffers
    x = torch.randn(6, 3)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert model.batchnorm.weight.is_meta and model.batchnorm.running_var.is_meta == offload_buffers
    assert streamer_of(model).stats.fetches == 3
    want, got = ref.state_dict(), get_state_dict_offloaded_model(model)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert model.linear1.weight.is_meta   # read from where it waits, not brought in
    remove_hook_from_submodules(model)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_cpu_offload_of_a_transformers_model_equals_it(ckpts, name):
    """cpu_offload of transformers' `from_pretrained` model, and of one built on meta with
    the weights passed as `state_dict` (accelerate's two uses): the same logits."""
    from distload import cpu_offload

    path = ckpts[name]
    want = _reference(path, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cpu_offload(model, offload_buffers=True)
    assert all(p.is_meta for p in model.parameters())
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)
    state_dict = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.tie_weights()
    cpu_offload(model, state_dict=state_dict)
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


@pytest.mark.parametrize("api", ["load_checkpoint_and_dispatch", "load_checkpoint_in_model", "dispatch_model"])
def test_offload_buffers_stay_off_the_device_until_their_module_runs(tmp_path, api):
    """`offload_buffers=True`: an offloaded module's buffers are streamed with its weights
    (on meta between uses) rather than kept on the device; the outputs are unchanged."""
    from distload import load_checkpoint_in_model
    from distload.offload import streamer_of

    path, ref = _stats_checkpoint(tmp_path, "safetensors")
    device_map = {"linear1": "cpu", "batchnorm": "disk", "linear2": "disk", "scale": "cpu", "shift": "cpu"}
    kw = dict(offload_buffers=True)
    if api == "dispatch_model":
        from distload import dispatch_model
        model = dispatch_model(copy.deepcopy(ref), device_map, offload_dir=tmp_path / "off", **kw)
    elif api == "load_checkpoint_in_model":
        model = _empty(False)
        load_checkpoint_in_model(model, path, device_map=device_map, offload_folder=tmp_path / "off", **kw)
    else:
        model = load_checkpoint_and_dispatch(_empty(False), path, device_map=device_map,
                                             offload_folder=tmp_path / "off", **kw)
    model.eval()
    assert model.batchnorm.running_mean.is_meta and model.batchnorm.num_batches_tracked.is_meta
    assert not model.shift.is_meta   # the root's buffer: no module streams it
    x = torch.randn(7, 3)
    for _ in range(2):
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    assert model.batchnorm.running_var.is_meta and streamer_of(model).stats.fetches >= 2
