"""The `demo` source, and random-weight checkpoints of any registered architecture for
tests and benchmarks (`make_checkpoint`, `scripts/make_checkpoint.py`).

Weights are a pure function of (config, seed, tensor name), generated one tensor at a time
and streamed to the sharded writer, so making a checkpoint never holds more than one
shard, and two machines make byte-identical files: each node makes its own demo
checkpoint once (under a file lock), and every node's is the same.

The one source that knows of models: it builds the demo model on meta for its shapes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from .cache import cache_root
from ..checkpoint.index import CheckpointIndex, index_checkpoint
from ..checkpoint.writer import write_sharded_checkpoint
from ..dist import DEFAULT_TIMEOUT_S
from ..checkpoint.dtypes import FLOAT32_STEP_ELEMENTS, dtype_from_name, dtype_name
from ..log import logger
from ..models import build_model, config_from_dict
from .base import Source, register_source

__all__ = ["DEMO_CONFIG", "DEMO_SHARDS", "DemoSource", "ensure_demo_checkpoint", "make_checkpoint"]

# A small Llama (~33.6 M parameters, ~134 MB in float32, 4 shards): big enough that a
# pipeline over 2-4 ranks has real work, small enough to make in seconds.
DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
DEMO_SHARDS = 4
_DEMO_SEED = 0
_DEMO_FORMAT = 1  # bump when the weights' recipe changes, so old caches are not reused


def ensure_demo_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo checkpoint's directory, made on first use.

    It lives in `cache_dir`, else ``$DISTLOAD_CACHE``, else ``~/.cache/distload``, under
    a name that hashes its config. Any number of ranks or jobs may call this at once: one
    makes it under a file lock, the others wait and reuse it, and the directory appears
    only complete (the writer renames it into place).

    Example::

        path = ensure_demo_checkpoint()   # .../demo-1a2b3c4d5e6f
    """
    root = cache_root(cache_dir)
    path = root / f"demo-{_recipe_key()}"
    if path.is_dir():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock", timeout=DEFAULT_TIMEOUT_S):   # another process making it
        if not path.is_dir():  # another process may have made it while we waited
            logger.info("making the demo checkpoint in %s", path)
            make_checkpoint(DEMO_CONFIG, path, num_shards=DEMO_SHARDS, seed=_DEMO_SEED)
    return path


def _recipe_key() -> str:
    recipe = {"config": DEMO_CONFIG, "shards": DEMO_SHARDS, "seed": _DEMO_SEED,
              "format": _DEMO_FORMAT}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


@register_source
class DemoSource(Source):
    """`--model demo` (or an empty `--model`): the demo checkpoint, made on each node the
    first time it is needed there."""

    kind = "demo"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec in ("", "demo")

    def index(self) -> CheckpointIndex:
        return index_checkpoint(ensure_demo_checkpoint(self.cache_dir))

    def identity(self) -> dict:
        return {"kind": self.kind, "label": "demo", "recipe": _recipe_key()}

    def node_files(self, reads) -> tuple[str, ...]:
        """The files the node's ranks read: the demo checkpoint is made whole, once per
        node (a node whose ranks read nothing still makes it: `root` needs it)."""
        return tuple(sorted(set(reads)))

    def fetch(self, files, *, sizes=None) -> int:
        """Make this node's demo checkpoint (all of it) unless it is there; its bytes."""
        path = cache_root(self.cache_dir) / f"demo-{_recipe_key()}"
        if path.is_dir():
            return 0
        ensure_demo_checkpoint(self.cache_dir)
        return sum(f.stat().st_size for f in path.iterdir())

    def root(self) -> str:
        return str(ensure_demo_checkpoint(self.cache_dir))


def make_checkpoint(
    config: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    num_shards: int,
    dtype: torch.dtype | str | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-weight checkpoint of `config` (a Hugging Face config dict) to
    `out_dir` (which must not exist) in `num_shards` safetensors shards (fewer only if
    there are fewer tensors), in `dtype` (default: the config's, else float32).

    Matrices and embeddings are N(0, 0.02), norm scales (`StageModel.is_norm_scale`) 1 + N(0, 0.05), biases
    N(0, 0.02); each tensor from its own generator seeded by `seed` and the CRC-32 of its
    name. A tied `lm_head.weight` is not written, as in Hugging Face checkpoints.

    Example::

        make_checkpoint({**DEMO_CONFIG, "num_hidden_layers": 2}, "tiny", num_shards=3)
    """
    cfg = config_from_dict(config)
    if dtype is None:
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype.removeprefix("torch."))
    with torch.device("meta"):
        model = build_model(cfg)
    # state_dict() already leaves out a tied head; meta tensors carry only shapes; the
    # model's family says which weights scale a norm (drawn near one)
    specs = [(name, tuple(t.shape), model.is_norm_scale(name))
             for name, t in model.state_dict(keep_vars=True).items()]
    del model
    sizes = [math.prod(shape) * dtype.itemsize for _, shape, _ in specs]
    out_config = dict(config) | {"torch_dtype": dtype_name(dtype)}
    if "dtype" in out_config:
        out_config["dtype"] = dtype_name(dtype)

    def tensors():
        for name, shape, is_norm in specs:
            yield name, _random_tensor(name, shape, seed, dtype, is_norm=is_norm)

    return write_sharded_checkpoint(tensors(), out_dir, config=out_config,
                                    max_shard_bytes=_shard_capacity(sizes, num_shards))


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype, *,
                   is_norm: bool) -> torch.Tensor:
    # Seeded per name, so a tensor's values do not depend on which others exist; drawn in
    # float32 chunks, so a 128k-vocabulary embedding needs no float32 copy of itself.
    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), FLOAT32_STEP_ELEMENTS):
        noise = torch.randn(min(FLOAT32_STEP_ELEMENTS, flat.numel() - start), generator=gen)
        flat[start:start + noise.numel()] = 1.0 + 0.05 * noise if is_norm else 0.02 * noise
    return out


def _shard_capacity(sizes: list[int], num_shards: int) -> int:
    """The smallest `max_shard_bytes` for which the writer's in-order packing (start a new
    shard when the next tensor would overflow) makes at most `num_shards` shards."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")

    def shards(cap: int) -> int:
        count, fill = 1, 0
        for s in sizes:
            if fill and fill + s > cap:
                count, fill = count + 1, 0
            fill += s
        return count

    lo = max([-(-sum(sizes) // num_shards), *sizes, 1])
    hi = max(sum(sizes), lo)
    while lo < hi:  # the count only falls as the capacity grows
        mid = (lo + hi) // 2
        if shards(mid) <= num_shards:
            hi = mid
        else:
            lo = mid + 1
    return lo
