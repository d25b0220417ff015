"""Write a random-weight checkpoint (HF sharded safetensors) for tests and benchmarks: a
Llama-family one from size flags, or any built-in architecture from a config.json. With
`--headers-only`, real safetensors headers over a sparse data area (the files have their
full size, but no byte of data is written): enough to plan a real-size model
(`--explain`) without its weights.

    python scripts/make_checkpoint.py /data/ckpt-1.4gb --preset 1.4gb
    python scripts/make_checkpoint.py OUT --layers 16 --hidden 2048 --intermediate 5632 \\
        --heads 16 --kv-heads 8 --vocab 32000 --dtype bfloat16 --shards 6 --model-type llama
    python scripts/make_checkpoint.py /tmp/qwen3-30b --config scripts/configs/qwen3-30b-a3b.json \\
        --headers-only --shards 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

from distload.sources.demo import make_checkpoint
from distload.models import SUPPORTED_MODEL_TYPES

# ~697 M parameters: 1.39 GB in bfloat16, 6 shards of ~232 MB.
PRESETS: dict[str, dict] = {
    "1.4gb": {"layers": 12, "hidden": 2048, "intermediate": 5632, "heads": 16, "kv_heads": 8,
              "vocab": 32000, "dtype": "bfloat16", "shards": 6, "model_type": "llama",
              "tie": False},
    # ~2.0 B parameters: 4.04 GB in bfloat16, 16 shards of ~250 MB (scripts/gpu_check.sh).
    "4gb": {"layers": 40, "hidden": 2048, "intermediate": 5632, "heads": 16, "kv_heads": 8,
            "vocab": 32000, "dtype": "bfloat16", "shards": 16, "model_type": "llama",
            "tie": False},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, help="directory to create (must not exist)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named size; overrides the sizes")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--model-type", choices=SUPPORTED_MODEL_TYPES, default="llama")
    p.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, help="a config.json of any built-in model type; "
                   "replaces the size flags (--dtype still sets the weights' dtype)")
    p.add_argument("--headers-only", action="store_true",
                   help="write headers and a sparse (unwritten) data area only")
    args = p.parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset].items():
            setattr(args, key, value)
    return args


def config_from_args(args: argparse.Namespace) -> dict:
    return {
        "model_type": args.model_type,
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": args.tie,
        "hidden_act": "silu",
        "torch_dtype": args.dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# In an FP8 checkpoint (DeepSeek-V3's layout) these stay in the checkpoint's dtype: every
# other matrix of the decoder layers is e4m3 with a float32 scale per block.
_NOT_FP8 = ("embed_tokens", "lm_head", "norm", ".mlp.gate.weight")


def _tensor_specs(name: str, shape: tuple[int, ...], dtype: str, config: dict
                  ) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, safetensors dtype, shape, bytes) of what the checkpoint stores for parameter
    `name`: the parameter itself, or — `config` declaring fp8 block scales — its e4m3
    values and their ``_scale_inv`` grid (the last block of a side clipped)."""
    quant = config.get("quantization_config") or {}
    if name.endswith("e_score_correction_bias"):
        return [(name, "F32", shape, math.prod(shape) * 4)]
    if quant.get("quant_method") == "fp8" and len(shape) == 2 and name.startswith("model.layers.") \
            and not any(part in name for part in _NOT_FP8):
        b0, b1 = quant.get("weight_block_size") or (shape[0], shape[1])
        grid = (-(-shape[0] // b0), -(-shape[1] // b1))
        return [(name, "F8_E4M3", shape, math.prod(shape)),
                (name + "_scale_inv", "F32", grid, math.prod(grid) * 4)]
    return [(name, _ST_DTYPES[dtype], shape, math.prod(shape) * getattr(torch, dtype).itemsize)]


def write_headers_only(config: dict, out_dir: Path, *, num_shards: int, dtype: str) -> Path:
    """A checkpoint of `config` whose shards hold real safetensors headers, sized as the
    full files (`os.truncate`: the data area is a hole, no byte written), with its index
    and config.json. Tensors in the model's state-dict order, in at most `num_shards`; a
    config declaring fp8 block scales gets DeepSeek-V3's FP8 layout (`_tensor_specs`)."""
    from distload.models import build_model

    with torch.device("meta"):
        model = build_model(config)
    specs = [spec for name, t in model.state_dict(keep_vars=True).items()
             for spec in _tensor_specs(name, tuple(t.shape), dtype, config)]
    total = sum(size for *_, size in specs)
    cap = -(-total // num_shards)
    shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
    fill = 0
    for spec in specs:
        size = spec[3]
        if fill and fill + size > cap and len(shards) < num_shards:  # the last takes the rest
            shards.append([])
            fill = 0
        shards[-1].append(spec)
        fill += size
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, st_dtype, shape, size in tensors:
            header[name] = {"dtype": st_dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(tmp / file, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
        os.truncate(tmp / file, 8 + len(text) + offset)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=1))
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out_dir.exists():
        sys.exit(f"error: {args.out_dir} exists; choose a new directory")
    start = time.perf_counter()
    config = json.loads(args.config.read_text()) if args.config else config_from_args(args)
    if args.headers_only:
        path = write_headers_only(config, args.out_dir, num_shards=args.shards, dtype=args.dtype)
    else:
        path = make_checkpoint(config, args.out_dir, num_shards=args.shards, dtype=args.dtype,
                               seed=args.seed)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    total = index["metadata"]["total_size"]
    print(f"{path}\nshards: {len(shards)}\ntotal bytes: {total} ({total / 1e9:.2f} GB)"
          f"\nseconds: {time.perf_counter() - start:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
