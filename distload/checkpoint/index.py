"""Finding a checkpoint's files and indexing every tensor in them, from headers alone.

Rank 0 calls `index_checkpoint` once; the planner turns the result into read items. The
index is validated as a whole here (every shard present, every mapped tensor where the
index says, no tensor twice), so that later stages may trust it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from distload.checkpoint.bin import read_bin_metas
from distload.checkpoint.files import check_checkpoint_file, missing_path_message, open_checkpoint_file
from distload.checkpoint.safetensors_header import MAX_HEADER_BYTES, _read_header, parse_safetensors_header
from distload.checkpoint.types import TensorMeta
from distload.errors import CheckpointError
from distload.log import logger

__all__ = ["CheckpointIndex", "index_checkpoint", "index_from_headers", "read_weight_map"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
CONFIG = "config.json"

_MAX_READERS = 8  # header reads are tiny; a few threads hide per-file open latency
MAX_JSON_BYTES = MAX_HEADER_BYTES
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")  # config.json and index files: a larger one is not one


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of one checkpoint: which file, where, what dtype and shape.

    `root` is the directory the checkpoint lives in on this machine; `files` (absolute,
    under `root`) are sorted, and `tensors` (read-only, ordered by file then offset) maps
    names to `TensorMeta`s naming those files; `file_sizes` maps each file to its size in
    bytes; `header_bytes` is the bytes taken by safetensors headers (0 for `.bin`);
    `config` is the parsed `config.json` beside the weights, if any. `relative()` gives
    the tensors and sizes with files relative to the root: what a plan holds, so that
    nothing planned names a path of the machine that indexed it.

    Example::

        idx = index_checkpoint("/models/llama")
        head = idx.tensors["lm_head.weight"]      # head.file: /models/llama/model-0000...
        tensors, sizes = idx.relative()           # tensors["lm_head.weight"].file: model-0000...
        print(idx.format, len(idx.files), idx.tensor_bytes)
    """

    root: str
    format: str
    files: tuple[str, ...]
    tensors: Mapping[str, TensorMeta] = field(hash=False, repr=False)
    header_bytes: int = 0
    config: dict | None = field(default=None, hash=False, repr=False)
    file_sizes: Mapping[str, int] = field(default_factory=dict, hash=False, repr=False)

    def __post_init__(self) -> None:
        # Read-only view: the index is shared by planner and loader and must not drift.
        if not isinstance(self.tensors, MappingProxyType):
            object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def path(self, file: str) -> str:
        """The path on this machine of `file` (relative to the root, or absolute)."""
        return os.path.join(self.root, file)

    def relative(self) -> tuple[dict[str, TensorMeta], dict[str, int]]:
        """(name -> meta, file -> size) with every file relative to `root`."""
        def rel(file: str) -> str:
            return os.path.relpath(file, self.root)

        return ({n: replace(m, file=rel(m.file)) for n, m in self.tensors.items()},
                {rel(f): size for f, size in self.file_sizes.items()})

    @property
    def tensor_bytes(self) -> int:
        """Sum of all tensors' byte lengths (what the ranks read, in total)."""
        return sum(m.length for m in self.tensors.values())

    def metas(self, names: Iterable[str]) -> list[TensorMeta]:
        """The metas of `names`, in that order; an unknown name raises `CheckpointError`."""
        out = []
        for name in names:
            meta = self.tensors.get(name)
            if meta is None:
                raise CheckpointError(f"{self.root}: checkpoint has no tensor {name!r}")
            out.append(meta)
        return out


def index_checkpoint(path: str | os.PathLike) -> CheckpointIndex:
    """Index the checkpoint at `path` (rank 0 only; no tensor data is read).

    `path` may be a directory holding `model.safetensors.index.json` + shards,
    `model.safetensors`, other `*.safetensors` files (all taken, sorted),
    `pytorch_model.bin.index.json` + shards or `pytorch_model.bin` (safetensors wins when
    both kinds exist), else its one `*.index.json` of any name, else all its `.bin`/`.pt`/
    `.pth` files; or a single `.safetensors` file, `*.index.json` (any name, also the flat
    ``{tensor: file}`` form, shards of any name) or torch file (`.bin`, `.pt`, `.pth`, any
    name: `torch.load(weights_only=True)`).

    Example::

        idx = index_checkpoint("ckpt/")     # or "ckpt/model-00001-of-00003.safetensors"
        metas = idx.metas(["model.embed_tokens.weight"])
    """
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(p):
        idx = _index_dir(p)
    elif os.path.isfile(p):
        idx = _index_file(p)
    else:
        raise CheckpointError(missing_path_message(p))
    logger.debug(
        "indexed %d tensors (%.3f GB) in %d %s file(s) of %s",
        len(idx.tensors), idx.tensor_bytes / 1e9, len(idx.files), idx.format, idx.root,
    )
    return idx


def _index_dir(root: str) -> CheckpointIndex:
    def join(name: str) -> str:
        return os.path.join(root, name)

    if os.path.isfile(join(SAFETENSORS_INDEX)):
        return _from_index_file(join(SAFETENSORS_INDEX), "safetensors")
    if os.path.isfile(join(SAFETENSORS_SINGLE)):
        return _build(root, "safetensors", [SAFETENSORS_SINGLE])
    loose = sorted(n for n in os.listdir(root) if n.endswith(".safetensors") and os.path.isfile(join(n)))
    if loose:
        logger.info("%s: no %s; taking all %d *.safetensors files", root, SAFETENSORS_INDEX, len(loose))
        return _build(root, "safetensors", loose)
    if os.path.isfile(join(BIN_INDEX)):
        return _from_index_file(join(BIN_INDEX), "bin")
    if os.path.isfile(join(BIN_SINGLE)):
        return _build(root, "bin", [BIN_SINGLE])
    # accelerate's rule for a folder: its one index of any name (weight_map.index.json)
    indexes = sorted(n for n in os.listdir(root) if n.endswith(".index.json") and os.path.isfile(join(n)))
    if len(indexes) == 1:
        return _from_index_file(join(indexes[0]))
    if len(indexes) > 1:
        raise CheckpointError(f"{root}: {len(indexes)} index files ({', '.join(indexes)}): "
                              "pass the one to load")
    torch_files = sorted(n for n in os.listdir(root) if n.endswith(_TORCH_SUFFIXES) and os.path.isfile(join(n)))
    if torch_files:
        logger.info("%s: no index; taking all %d torch file(s)", root, len(torch_files))
        return _build(root, "bin", torch_files)
    raise CheckpointError(
        f"{root}: no checkpoint found; looked for {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, "
        f"*.safetensors, {BIN_INDEX}, {BIN_SINGLE}, one *.index.json and *.bin/*.pt/*.pth"
    )


def _index_file(file: str) -> CheckpointIndex:
    root = os.path.dirname(file)
    if file.endswith(".index.json"):
        return _from_index_file(file)
    if file.endswith(".safetensors"):
        return _build(root, "safetensors", [os.path.basename(file)])
    # Anything else is a torch.save file (.bin, .pt, .pth, any name), read with
    # weights_only=True; one that is not says so, naming the file.
    return _build(root, "bin", [os.path.basename(file)])


def _load_json(file: str, what: str) -> dict:
    try:
        fd, size = open_checkpoint_file(file, f"its {what}")
        try:
            if size > MAX_JSON_BYTES:
                raise CheckpointError(f"{file}: {what} is {size} bytes (limit {MAX_JSON_BYTES}); "
                                      "not a config or index file?")
            raw = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        obj = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot parse {what}: {e}") from e
    except RecursionError:
        raise CheckpointError(f"{file}: cannot parse {what}: nested too deeply") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: {what} is a JSON {type(obj).__name__}, not an object")
    return obj


def read_weight_map(index_file: str) -> dict[str, str]:
    """The ``weight_map`` of the index file `index_file` (``model.safetensors.index.json``,
    or any ``*.index.json``; also the flat form, a JSON object ``{tensor: file}``):
    tensor name -> shard file relative to the index's directory, each checked to be a
    file name inside that directory. Raises `CheckpointError` naming the index.

    Example::

        read_weight_map("ckpt/model.safetensors.index.json")   # {"lm_head.weight": "model-00002-of-00002.safetensors", ...}
    """
    root = os.path.dirname(index_file)
    obj = _load_json(index_file, "checkpoint index")
    weight_map = obj.get("weight_map")
    if weight_map is None and obj and all(isinstance(v, str) for v in obj.values()):
        weight_map = obj   # the flat form, {tensor: file} (accelerate takes it)
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: index has no weight_map (or an empty one)")
    mapped: dict[str, str] = {}  # tensor -> shard path relative to the root
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index_file}: tensor {name!r} maps to {shard!r}, not a file name")
        if os.path.isabs(shard) or os.path.normpath(shard).startswith(".."):
            raise CheckpointError(f"{index_file}: shard {shard!r} (of {name!r}) lies outside {root}")
        mapped[name] = os.path.normpath(shard)
    return mapped


def _from_index_file(index_file: str, fmt: str | None = None) -> CheckpointIndex:
    """The checkpoint an index names; `fmt` None: safetensors when every shard's name ends
    in .safetensors, else torch files (any shard names)."""
    root = os.path.dirname(index_file)
    mapped = read_weight_map(index_file)
    if fmt is None:
        fmt = "safetensors" if all(f.endswith(".safetensors") for f in mapped.values()) else "bin"
    checked: set[str] = set()
    for name, file in mapped.items():
        if file not in checked:
            check_checkpoint_file(root, file, needed_for=f"{os.path.basename(index_file)} puts "
                                                         f"tensor {name!r} in it")
            checked.add(file)
    return _build(root, fmt, sorted(set(mapped.values())), mapped=mapped)


def index_from_headers(
    root: str,
    headers: Mapping[str, tuple[bytes, int]],
    *,
    weight_map: Mapping[str, str] | None = None,
    config: dict | None = None,
) -> CheckpointIndex:
    """The index of a safetensors checkpoint whose files are not (all) on this machine,
    from their headers obtained elsewhere (a hub's range requests): `headers` maps each
    file, relative to `root`, to (its first bytes, at least the 8-byte length and the JSON
    header; the file's size). `root` is where the files would lie on this machine;
    `weight_map` (tensor -> file, as `read_weight_map` gives) is checked as for a local
    index; `config` is the parsed ``config.json`` (default: ``root/config.json`` where it
    exists, read as for a local checkpoint). Validated exactly as `index_checkpoint`
    validates local files.

    Example::

        idx = index_from_headers("/hf/snapshots/abc", {"model.safetensors": (first_bytes, size)})
    """
    files = sorted(headers)
    if weight_map is not None:
        missing = sorted(set(weight_map.values()) - set(files))
        if missing:
            raise CheckpointError(f"{os.path.join(root, missing[0])}: no header for this shard of the "
                                  "index's weight_map")
    results = [parse_safetensors_header(headers[f][0], headers[f][1], file=os.path.join(root, f))
               for f in files]
    return _assemble(root, "safetensors", files, results, mapped=weight_map,
                     config=_read_config(root) if config is None else config,
                     sizes={f: headers[f][1] for f in files})


def _build(
    root: str, fmt: str, files: list[str], *, mapped: dict[str, str] | None = None
) -> CheckpointIndex:
    """Index `files` (relative to `root`)."""
    for file in files:
        check_checkpoint_file(root, file)

    def read(file: str) -> tuple[list[TensorMeta], int]:
        path = os.path.join(root, file)
        return _read_header(path) if fmt == "safetensors" else (read_bin_metas(path), 0)

    if len(files) > 1:
        workers = min(_MAX_READERS, len(files))
        with ThreadPoolExecutor(workers, thread_name_prefix="distload-hdr") as pool:
            results = list(pool.map(read, files))  # raises the first failing file's error
    else:
        results = [read(f) for f in files]
    return _assemble(root, fmt, files, results, mapped=mapped, config=_read_config(root),
                     sizes={f: os.path.getsize(os.path.join(root, f)) for f in files})


def _assemble(root: str, fmt: str, files: list[str], results: list[tuple[list[TensorMeta], int]], *,
              mapped: Mapping[str, str] | None, config: dict | None, sizes: Mapping[str, int]
              ) -> CheckpointIndex:
    """One index from each file's (metas, header size): no tensor twice, the weight map
    (tensor -> file relative to `root`) where the files say."""
    tensors: dict[str, TensorMeta] = {}
    for metas, _ in results:
        for meta in metas:
            seen = tensors.get(meta.name)
            if seen is not None:
                raise CheckpointError(
                    f"tensor {meta.name!r} is in two files: {seen.file} and {meta.file}"
                )
            tensors[meta.name] = meta
    if mapped is not None:
        _check_weight_map(root, {n: os.path.join(root, f) for n, f in mapped.items()}, tensors)
    return CheckpointIndex(
        root=root,
        format=fmt,
        files=tuple(os.path.join(root, f) for f in files),
        tensors=tensors,
        header_bytes=sum(size for _, size in results),
        config=config,
        file_sizes={os.path.join(root, f): sizes[f] for f in files},
    )


def _check_weight_map(root: str, mapped: dict[str, str], tensors: dict[str, TensorMeta]) -> None:
    for name, file in mapped.items():
        meta = tensors.get(name)
        if meta is None:
            raise CheckpointError(f"{file}: index maps tensor {name!r} here, but the file lacks it")
        if meta.file != file:
            raise CheckpointError(
                f"{file}: index maps tensor {name!r} here, but the file lacks it (it is in {meta.file})"
            )
    extra = [n for n in tensors if n not in mapped]
    if extra:  # a stale index: the shards are the truth, so keep them, but say so
        logger.warning(
            "%s: %d tensor(s) in the shards are missing from the index weight_map (e.g. %r); "
            "loading them anyway", root, len(extra), extra[0],
        )


def _read_config(root: str) -> dict | None:
    file = os.path.join(root, CONFIG)
    return _load_json(file, "model config") if os.path.isfile(file) else None
