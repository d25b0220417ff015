"""Writing a checkpoint in the Hugging Face sharded layout, atomically.

Used by the demo model and `scripts/make_checkpoint.py`; tensors arrive one at a time so
at most one shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from .files import byte_view
from .index import SAFETENSORS_INDEX as INDEX_NAME
from .types import SAFETENSORS_DTYPES

__all__ = ["write_sharded_checkpoint", "INDEX_NAME"]


def write_sharded_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    config: dict,
    max_shard_bytes: int,
) -> Path:
    """Write `tensors` as `model-0000K-of-0000N.safetensors` shards of at most
    `max_shard_bytes` each (a larger single tensor gets its own shard), plus
    `model.safetensors.index.json` and `config.json`.

    The checkpoint is built in a temporary sibling directory and renamed into place, so
    `out_dir` either does not exist or is complete. `out_dir` must not exist yet.

    Example::

        write_sharded_checkpoint(model.state_dict().items(), "ckpt", config=cfg,
                                 max_shard_bytes=50 << 20)
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite a checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a shared cache must be readable
    try:
        shard_names = _write_shards(tensors, tmp, max_shard_bytes)
        _write_index_and_config(tmp, shard_names, config)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(tensors, tmp: Path, max_shard_bytes: int) -> list[tuple[str, list[str], int]]:
    shards: list[tuple[str, list[str], int]] = []  # (temp file name, tensor names, bytes)
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"shard-{len(shards):05d}.tmp"
            _save_shard(pending, tmp / name)
            shards.append((name, list(pending), pending_bytes))
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += nbytes
    flush()
    return shards


def _write_index_and_config(tmp: Path, shards, config: dict) -> None:
    total = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for k, (temp_name, names, nbytes) in enumerate(shards, start=1):
        final = f"model-{k:05d}-of-{total:05d}.safetensors"
        os.rename(tmp / temp_name, tmp / final)
        weight_map.update({n: final for n in names})
        total_size += nbytes
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


_ST_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors file tensor by tensor (safetensors' `save_file` builds the
    whole file in memory first)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data area starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                data = t.detach().cpu().contiguous()  # held while its view is written: it owns the bytes
                f.write(byte_view(data))
        f.flush()
        os.fsync(f.fileno())
