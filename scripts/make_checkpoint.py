"""Write a random-weight Llama-family checkpoint (HF sharded safetensors) for tests and
benchmarks.

    python scripts/make_checkpoint.py /data/ckpt-1.4gb --preset 1.4gb
    python scripts/make_checkpoint.py OUT --layers 16 --hidden 2048 --intermediate 5632 \\
        --heads 16 --kv-heads 8 --vocab 32000 --dtype bfloat16 --shards 6 --model-type llama
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out_dir.exists():
        sys.exit(f"error: {args.out_dir} exists; choose a new directory")
    start = time.perf_counter()
    path = make_checkpoint(config_from_args(args), args.out_dir, num_shards=args.shards,
                           dtype=args.dtype, seed=args.seed)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    total = index["metadata"]["total_size"]
    print(f"{path}\nshards: {len(shards)}\ntotal bytes: {total} ({total / 1e9:.2f} GB)"
          f"\nseconds: {time.perf_counter() - start:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
