"""PyTorch `.bin` checkpoints (`torch.save` zip files, any name: `.pt`, `.pth`), read
safely and lazily.

A `.bin` file has no byte-range header: its tensors' places are known only to the
unpickler. So it is opened with `torch.load(mmap=True, weights_only=True)`: the pickle is
restricted to tensors and plain containers (never arbitrary objects, which could run code)
and the storages stay memory-mapped, so only the pages a caller touches are read.
`TensorMeta.offset` is therefore -1 for these files; readers go through `load_bin_tensors`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping

import torch

from distload.checkpoint.types import TensorMeta
from .dtypes import dtype_name
from distload.errors import CheckpointError

__all__ = ["read_bin_metas", "load_bin_tensors"]


def _load_state_dict(file: str) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(file, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file}: refusing to unpickle arbitrary objects: this .bin holds more than tensors "
            f"(weights_only loading failed: {str(e).splitlines()[0]}); convert it to safetensors "
            "with a loader you trust"
        ) from e
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: no such file") from e
    except RuntimeError as e:
        if "mmap can only be used" in str(e):  # pre-1.6 pickle format, or not torch at all
            raise CheckpointError(
                f"{file}: not a zip-format torch.save file (legacy format or corrupt); re-save it "
                "with torch.save or convert it to safetensors"
            ) from e
        raise CheckpointError(f"{file}: cannot read .bin checkpoint: {e}") from e
    except Exception as e:  # zipfile, EOF and friends: a damaged file
        raise CheckpointError(f"{file}: not a checkpoint file (a .safetensors file, a torch.save "
                              f"file or an *.index.json): {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a state dict")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{file}: entry {name!r} is a {type(value).__name__}, not a named tensor"
            )
    return obj


def read_bin_metas(path: str | os.PathLike) -> list[TensorMeta]:
    """Return one `TensorMeta` per tensor of the `.bin` file `path` (offset -1), by name.

    Example::

        metas = read_bin_metas("pytorch_model.bin")
        total = sum(m.length for m in metas)
    """
    file = os.path.abspath(os.fspath(path))
    state = _load_state_dict(file)
    return sorted(
        TensorMeta(
            name=name,
            file=file,
            dtype=dtype_name(t.dtype),
            shape=tuple(t.shape),
            offset=-1,  # no byte range: the storage lives inside a zip member
            length=t.numel() * t.element_size(),
        )
        for name, t in state.items()
    )


def load_bin_tensors(file: str | os.PathLike, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Return the named tensors of the `.bin` `file`, still memory-mapped.

    The tensors share pages with the file mapping: callers copy them (``.to(device)`` or
    ``.clone()``) before keeping them. A name the file lacks raises `CheckpointError`.

    Example::

        t = load_bin_tensors("pytorch_model.bin", ["lm_head.weight"])["lm_head.weight"]
        weight.copy_(t)
    """
    path = os.path.abspath(os.fspath(file))
    state = _load_state_dict(path)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in state:
            raise CheckpointError(f"{path}: has no tensor {name!r}")
        out[name] = state[name]
    return out
