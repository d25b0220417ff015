"""What the architecture tests (`test_archs.py`, `test_archs_more.py`,
`test_archs_frontier.py`, `test_archs_fam.py`, `test_archs_gemma4.py`) share: the cases'
checkpoints, transformers' outputs on the left-padded batch (the reference), one torchrun
launch of `workers/arch_pipeline.py` over many checkpoints, the checks of one checkpoint's
results against its reference, the check that a transform is seen, the config mutation
check, and the check of served greedy answers against transformers' (also
`test_serve_http.py`'s).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distload.models.common.attention import position_ids_from_mask

from .archs import left_padded_batch, make_hf_checkpoint, repack_experts
from .mp import torchrun, worker

ATOL = 1e-4   # float32 logits against transformers'
NEW = 12      # greedy tokens generated (the worker's count)

# any JSON value: what a config.json field may hold
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats()
                           | st.text(max_size=6),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)


def make_checkpoints(root: Path, names: Iterable[str], config_of: Callable, packed: Iterable[str] = ()) -> dict:
    """name -> directory under `root`: each case of `names` (its config `config_of(name)`),
    and ``<name>_packed`` (its experts packed) for each of `packed`."""
    out = {name: make_hf_checkpoint(name, root / name, config_of(name)) for name in names}
    for name in packed:
        out[f"{name}_packed"] = repack_experts(out[name], root / f"{name}_packed")
    return out


def case_references(checkpoints: dict, names: Iterable[str], *, moe: Iterable[str] = (),
                    nested: Iterable[str] = ()) -> dict:
    """name -> `reference_outputs` of transformers' model of each case of `names` (its
    image-text class for `nested`; eager experts for `moe`: transformers' grouped_mm
    experts need 16-byte strides, which odd sizes lack)."""
    import transformers

    refs = {}
    for name in names:
        kw = {"experts_implementation": "eager"} if name in moe else {}
        cls = transformers.AutoModelForImageTextToText if name in nested else transformers.AutoModelForCausalLM
        refs[name] = reference_outputs(cls.from_pretrained(checkpoints[name], dtype=torch.float32, **kw).eval())
    return refs


def reference_outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, greedy tokens) of transformers `model` on the left-padded batch, no EOS."""
    model.generation_config.eos_token_id = None
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return logits, tokens


def run_pipelines(world: int, out, paths: list, *, disk: tuple = (), dtype: str | None = None) -> dict:
    """Every checkpoint of `paths` loaded in turn across `world` ranks in one torchrun
    launch (then each of `disk` with half its layers on the disk tier): rank 0's results,
    by checkpoint name (``<name>@disk`` for the latter)."""
    options = [a for p in disk for a in ("--disk", str(p))] + (["--dtype", dtype] if dtype else [])
    proc = torchrun(world, [worker("arch_pipeline.py"), str(out), *options, *map(str, paths)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out / "results.pt")


def check_outputs(name: str, got: dict, references: dict, world: int) -> int:
    """One checkpoint's `got` against the reference of its case (`name` without ``@disk``
    or ``_packed``): logits within `ATOL` on real tokens, the same greedy tokens, one
    non-empty stage per rank. Returns the bytes the ranks hold on the disk tier."""
    ref_logits, ref_tokens = references[name.split("@")[0].removesuffix("_packed")]
    real = left_padded_batch()[1].bool()
    assert got["logits"].shape == ref_logits.shape, name
    err = (got["logits"][real] - ref_logits[real]).abs().max().item()
    assert err <= ATOL, f"{name}: logits differ from transformers' by {err:.2e}"
    assert torch.equal(got["tokens"], ref_tokens), f"{name}: greedy tokens differ"
    assert len(got["units"]) == world and all(got["units"]), name
    return sum(r["offloaded_bytes_by_tier"]["disk"] for r in got["job_report"]["ranks"])


def check_pipelines(results: dict, names: list[str], disk, references: dict, world: int) -> None:
    """`check_outputs` for each of `names` and ``<name>@disk`` for each of `disk`, and what
    each rank read: only its own tensors' bytes (packed experts: byte ranges inside the
    packed tensors), together exactly the checkpoint's — disk-tier weights are references
    into the checkpoint's files, read when their layer runs, and only ``@disk`` loads have
    them, on every rank."""
    for name in list(names) + [f"{n}@disk" for n in disk]:
        got = results[name]
        on_disk = check_outputs(name, got, references, world)
        ranks = got["job_report"]["ranks"]
        assert sum(r["bytes_read"] for r in ranks) + on_disk == got["checkpoint_bytes"], name
        assert (on_disk > 0 and all(r["offloaded_bytes"] > 0 for r in ranks)) == name.endswith("@disk"), name


def check_transform_seen(path: Path, neutral: dict, reference_logits: torch.Tensor) -> None:
    """Our logits of the checkpoint at `path` with config.json's keys `neutral` (a
    transform switched off; written to a copy beside it) are far from transformers'
    `reference_logits`: the logit checks would catch a skipped transform."""
    import distload

    copy = path.parent / f"{path.name}_neutral_{sorted(neutral)[0]}"
    shutil.copytree(path, copy)
    config = json.loads((path / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **neutral}))
    pipe = distload.load(str(copy), device="cpu")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = pipe.forward(ids, mask)
    real = mask.bool()
    assert (logits[real] - reference_logits[real]).abs().max() > 100 * ATOL


def check_config_mutations(base: dict, keys: list[str], *, examples: int, nested: str | None = None) -> None:
    """Any JSON value in any of `keys` of the config dict `base` (of its dict under `nested`
    where given): the config reads or is refused with a ValueError (which the loader turns
    into one line naming config.json), never another exception."""
    from distload.models import config_from_dict

    inner = base[nested] if nested else base

    @settings(max_examples=examples, deadline=None)
    @given(key=st.sampled_from(keys), value=JSON_VALUES)
    def mutate(key, value):
        config = {**base, nested: {**inner, key: value}} if nested else {**base, key: value}
        try:
            config_from_dict(config)
        except ValueError:
            pass

    mutate()


def check_greedy_answers(model, seqs) -> None:
    """Each served sequence of `seqs` (`distload.serve.sequence.Sequence`, done) answered
    what transformers' `model` generates greedily for its prompt alone."""
    for seq in seqs:
        with torch.no_grad():
            out = model.generate(torch.tensor([seq.prompt]), max_new_tokens=seq.max_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0,
                                 attention_mask=torch.ones(1, len(seq.prompt), dtype=torch.long))
        assert seq.output == out[0, len(seq.prompt):].tolist(), seq.prompt
