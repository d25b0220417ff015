"""The built-in Llama-family models against transformers, the independent reference.

Each case writes a tiny random checkpoint with `make_checkpoint`, loads it into
`AutoModelForCausalLM` and into our model (built on meta, materialized, weights assigned
from safetensors' own reader), and compares logits: plain, left-padded, decoded token by
token through a `KVCache`, and run as two pipeline stages chained by hand.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from distload.sources.demo import make_checkpoint
from distload.meta import find_tied_parameters, materialize
from distload.models import (
    SUPPORTED_MODEL_TYPES, KVCache, LlamaConfig, build_model, config_from_dict,
)
from distload.models.llama import rope_inv_freq

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
BASE = tiny_config(vocab_size=96, intermediate_size=112, num_hidden_layers=3, hidden_act="silu")
CASES = {
    "llama": {"model_type": "llama"},
    "llama_tied": {"model_type": "llama", "tie_word_embeddings": True},
    # original_max 32 puts the 8 frequencies of head_dim 16 in all three llama3 regimes.
    "llama3_rope": {"model_type": "llama", "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    # transformers 5's layout: everything in `rope_parameters`.
    "llama3_rope_parameters": {"model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0,
        "low_freq_factor": 1.0, "high_freq_factor": 2.0,
        "original_max_position_embeddings": 64}},
    "linear_rope": {"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}},
    # YaRN as model cards add it for long contexts: a ramp over the 8 frequencies of head_dim 16.
    "yarn_rope": {"model_type": "llama", "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    "yarn_rope_mscale": {"model_type": "qwen2", "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
        "beta_fast": 16, "beta_slow": 2, "mscale": 0.7, "mscale_all_dim": 1.0, "truncate": False}},
    "llama_bias_head_dim": {"model_type": "llama", "attention_bias": True, "mlp_bias": True,
                            "head_dim": 24},
    "mistral_sliding": {"model_type": "mistral", "sliding_window": 5},
    "qwen2_tied": {"model_type": "qwen2", "tie_word_embeddings": True},
    "qwen2_sliding": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
                      "max_window_layers": 1},
}


class Case:
    def __init__(self, name: str, root) -> None:
        self.name = name
        self.config = {**BASE, **CASES[name]}
        self.dir = make_checkpoint(self.config, root / name, num_shards=3, dtype=torch.float32)
        self.weights: dict[str, torch.Tensor] = {}
        for f in sorted(self.dir.glob("*.safetensors")):
            self.weights.update(load_file(f))
        self.ref = transformers.AutoModelForCausalLM.from_pretrained(
            self.dir, dtype=torch.float32).eval()
        self.model = self.build()

    def build(self, keep=lambda m: None):
        """Our model: on meta, cut down by `keep`, materialized, weights assigned."""
        with torch.device("meta"):
            model = build_model(self.config)
        keep(model)
        materialize(model, "cpu")
        wanted = set(model.state_dict())
        if model.config.tie_word_embeddings and model.lm_head is not None:
            wanted.add("model.embed_tokens.weight")  # a head-only stage loads the head from it
        model.load_state_dict({k: v for k, v in self.weights.items() if k in wanted},
                              strict=True, assign=True)
        return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp("ckpt"))


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def _left_padded(lengths: list[int], t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = _ids(len(lengths), t, seed=1)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, t - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def test_logits_match_transformers(case: Case) -> None:
    ids = _ids(2, 16)
    pos = torch.arange(16).expand(2, -1)
    ours = case.model(ids, position_ids=pos)
    ref = case.ref(ids).logits
    assert ours.shape == ref.shape == (2, 16, BASE["vocab_size"])
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_positions_default_as_transformers_makes_them(case: Case) -> None:
    """`model(ids)` as with a transformers model: positions from the mask (left padding
    starts at 0), else counting on from the cache."""
    ids, mask, pos = _left_padded([12, 9, 4], 12)
    torch.testing.assert_close(case.model(ids, attention_mask=mask),
                               case.model(ids, position_ids=pos, attention_mask=mask), atol=0, rtol=0)
    plain = _ids(2, 9)
    torch.testing.assert_close(case.model(plain), case.ref(plain).logits, atol=ATOL, rtol=0)
    cache = KVCache()
    case.model(plain[:, :6], cache=cache)
    torch.testing.assert_close(case.model(plain[:, 6:], cache=cache), case.ref(plain).logits[:, 6:],
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padding_matches_transformers(case: Case) -> None:
    ids, mask, pos = _left_padded([12, 9, 4], 12)
    ours = case.model(ids, position_ids=pos, attention_mask=mask)
    ref = case.ref(ids, attention_mask=mask, position_ids=pos).logits
    assert torch.isfinite(ours).all()
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
    # A padded row equals that sequence run alone.
    alone = case.model(ids[1:2, 3:], position_ids=torch.arange(9)[None])
    torch.testing.assert_close(ours[1, 3:], alone[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_incremental_decode_equals_full_forward(case: Case) -> None:
    ids, mask, pos = _left_padded([10, 7], 10)
    full = case.model(ids, position_ids=pos, attention_mask=mask)
    cache = KVCache()
    prefill = 4
    steps = [case.model(ids[:, :prefill], position_ids=pos[:, :prefill],
                        attention_mask=mask[:, :prefill], cache=cache)]
    for t in range(prefill, 10):
        steps.append(case.model(ids[:, t:t + 1], position_ids=pos[:, t:t + 1],
                                attention_mask=mask[:, :t + 1], cache=cache))
    assert cache.length == 10
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=ATOL, rtol=0)


@torch.no_grad()
def test_split_stages_chain_to_full_model(case: Case) -> None:
    cut = 1

    def first(m) -> None:
        for key in [k for k in m.model.layers if int(k) >= cut]:
            del m.model.layers[key]
        m.model.norm = None
        m.lm_head = None

    def second(m) -> None:
        m.model.embed_tokens = None
        for key in [k for k in m.model.layers if int(k) < cut]:
            del m.model.layers[key]

    a, b = case.build(first), case.build(second)
    assert not any(p.is_meta for p in [*a.parameters(), *b.parameters()])
    ids, mask, pos = _left_padded([8, 5], 8)
    full = case.model(ids, position_ids=pos, attention_mask=mask)
    hidden = a(ids, position_ids=pos, attention_mask=mask)
    assert hidden.shape == (2, 8, BASE["hidden_size"])
    real = mask.bool()
    torch.testing.assert_close(b(hidden, position_ids=pos, attention_mask=mask)[real],
                               full[real], atol=ATOL, rtol=0)
    # Decoding through the stages, each with its own cache.
    ca, cb = KVCache(), KVCache()
    out = [b(a(ids[:, :5], position_ids=pos[:, :5], attention_mask=mask[:, :5], cache=ca),
             position_ids=pos[:, :5], attention_mask=mask[:, :5], cache=cb)]
    for t in range(5, 8):
        kw = {"position_ids": pos[:, t:t + 1], "attention_mask": mask[:, :t + 1]}
        out.append(b(a(ids[:, t:t + 1], cache=ca, **kw), cache=cb, **kw))
    torch.testing.assert_close(torch.cat(out, 1)[real], full[real], atol=ATOL, rtol=0)


def test_config_round_trip_and_transformers_agree(case: Case) -> None:
    cfg = config_from_dict(case.config)
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hf = case.ref.config
    assert cfg.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    # What transformers itself writes reads back the same (its token-id defaults aside).
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    assert dataclasses.replace(config_from_dict(hf.to_dict()), **ids) == cfg
    # RoPE frequencies recomputed on a device equal transformers' own.
    torch.testing.assert_close(rope_inv_freq(cfg, "cpu"), case.ref.model.rotary_emb.inv_freq,
                               atol=0, rtol=0)


def test_tied_embeddings_share_one_parameter() -> None:
    cfg = {**BASE, **CASES["llama_tied"]}
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()
    assert find_tied_parameters(model) == [["lm_head.weight", "model.embed_tokens.weight"]]
    materialize(model, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.model.rotary_emb.inv_freq.is_meta


def _three_sequences(case: str):
    """A model of `case`, 3 sequences of 9 ids, their positions and full-forward logits."""
    torch.manual_seed(0)
    model = build_model(config_from_dict({**BASE, **CASES[case]})).eval()
    ids, pos = _ids(3, 9), torch.arange(9).expand(3, -1)
    return model, ids, pos, model(ids, position_ids=pos)


@torch.no_grad()
def test_kv_cache_select_drops_sequences() -> None:
    model, ids, pos, full = _three_sequences("mistral_sliding")
    cache = KVCache()
    model(ids[:, :6], position_ids=pos[:, :6], cache=cache)
    cache.select([2, 0])
    assert cache.batch_size == 2 and cache.length == 6
    keep = torch.tensor([2, 0])
    step = model(ids[keep, 6:], position_ids=pos[keep, 6:], cache=cache)
    torch.testing.assert_close(step, full[keep, 6:], atol=ATOL, rtol=0)


def test_unsupported_config_is_named() -> None:
    with pytest.raises(ValueError, match=r"'mamba'.*llama, mistral, qwen2"):
        config_from_dict({**BASE, "model_type": "mamba"})
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        config_from_dict({**BASE, "model_type": "llama",
                          "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert SUPPORTED_MODEL_TYPES[:3] == ("llama", "mistral", "qwen2")  # then the other families


def test_config_reads_both_rope_layouts_and_defaults() -> None:
    old = config_from_dict({**BASE, "model_type": "llama", "rope_theta": 5e5,
                            "rope_scaling": {"type": "linear", "factor": 4}})
    new = config_from_dict({**{k: v for k, v in BASE.items() if k != "rope_theta"},
                            "model_type": "llama", "dtype": "float32",
                            "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5,
                                                "factor": 4.0}})
    assert old == new and old.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    plain = config_from_dict({**BASE, "model_type": "qwen2", "num_key_value_heads": None,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6
    assert plain.num_key_value_heads == 4 and plain.head_dim == 16
    assert plain.attention_bias and not plain.o_proj_bias and plain.sliding_window is None
    qwen = config_from_dict({**BASE, **CASES["qwen2_sliding"]})
    assert [qwen.layer_sliding_window(i) for i in range(3)] == [None, 4, 4]
    mistral = config_from_dict({**BASE, "model_type": "mistral"})
    assert mistral.sliding_window == 4096  # transformers' default when the key is absent


@torch.no_grad()
def test_kv_caches_of_parts_of_a_batch_stack_into_one() -> None:
    """Prefill in two parts (each its own cache), stacked, then decode: the same logits
    as one forward over the whole batch and sequence."""
    model, ids, pos, full = _three_sequences("llama_tied")
    first, second = KVCache(), KVCache()
    model(ids[:2, :6], position_ids=pos[:2, :6], cache=first)
    model(ids[2:, :6], position_ids=pos[2:, :6], cache=second)
    cache = KVCache.stacked([first, second])
    assert cache.batch_size == 3 and cache.length == 6
    step = model(ids[:, 6:], position_ids=pos[:, 6:], cache=cache)
    torch.testing.assert_close(step, full[:, 6:], atol=ATOL, rtol=0)
