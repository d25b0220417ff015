"""Looking after an offload directory: list its entries, verify them, collect garbage.

Any process may run these while loads use the directory: `gc` holds the manifest lock and
removes an entry only while holding that entry's stripe lock (never one being written),
and loads record the entries they need in the manifest before using them.

Nothing here follows a link or opens what is not a regular file: a ``data/<xx>`` that is a
symlink (or not a directory) is never entered, and an entry name that is a symlink, FIFO,
socket or device is reported by `verify` and `ls` (`foreign_entries`) and removed by `gc`
(the name only: `unlink` never touches a link's target).

Example::

    for row in list_entries(store): print(row["key"][:12], row["nbytes"], row["models"])
    bad = verify_store(store)          # [(key, name, problem), ...]
    result = gc_store(store)           # GcResult(entries=3, bytes=..., ...)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import Timeout

from .entry import Entry, OffloadError, not_regular, read_entry_file
from .store import OffloadStore

__all__ = ["iter_entry_files", "foreign_entries", "list_entries", "verify_store", "pending_entries",
           "GcResult", "gc_store"]


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _scan(store: OffloadStore) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(regular entry files, [(path, what it is)] of everything in their place that is not
    one), sorted; nothing followed."""
    entries, foreign = [], []
    data = store.root / "data"
    store.check_dir(data)
    if not _is_real_dir(data):
        return entries, foreign
    for sub in sorted(data.iterdir()):
        if len(sub.name) != 2:
            continue
        if not _is_real_dir(sub):
            foreign.append((sub, f"{not_regular(sub) or 'a file'}, not a directory (never followed)"))
            continue
        for path in sorted(sub.iterdir()):
            if path.name.startswith(".") or path.name[:2] != sub.name:
                continue
            kind = not_regular(path)
            if kind is None:
                entries.append(path)
            else:
                foreign.append((path, f"{kind}, not an entry file"))
    return entries, foreign


def iter_entry_files(store: OffloadStore) -> Iterator[Path]:
    """Every published entry file (temporaries excluded; only regular files in real
    directories: see `foreign_entries`), sorted."""
    yield from _scan(store)[0]


def foreign_entries(store: OffloadStore) -> list[tuple[Path, str]]:
    """(path, what it is) of every ``data/<xx>`` that is no real directory and every entry
    name that is no regular file (a symlink, a FIFO ...): a store holds none of its own."""
    return _scan(store)[1]


def _models_by_key(store: OffloadStore) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for record in store.read_manifest()["models"].values():
        label = f"{record['checkpoint']} ({record['dtype'] or 'native dtype'})"
        for key in record["keys"]:
            out.setdefault(key, []).append(label)
    return out


def list_entries(store: OffloadStore) -> list[dict]:
    """One dict per entry: key, kind, nbytes (of the tensor), disk_bytes (of the entry
    file), dtype, shape, name, source, and the models that need it."""
    models = _models_by_key(store)
    rows = []
    for path in iter_entry_files(store):
        try:
            e = read_entry_file(str(path))
            row = {"key": e.key, "kind": e.kind, "nbytes": e.nbytes, "dtype": e.dtype,
                   "shape": list(e.shape), "name": e.name, "source": e.source.file}
        except (OffloadError, OSError) as exc:
            row = {"key": path.name, "kind": "unreadable", "nbytes": 0, "dtype": "", "shape": [],
                   "name": str(exc), "source": ""}
        row["disk_bytes"] = path.lstat().st_size
        row["models"] = models.get(row["key"], [])
        rows.append(row)
    return rows


def verify_store(store: OffloadStore) -> list[tuple[str, str, str]]:
    """(key, tensor name, problem) for every entry whose size or checksum is wrong, or
    whose referenced source changed. Empty: all intact. (An entry a model recorded but
    nobody wrote yet — a load in progress, or one stopped by a full disk or a signal — is
    no problem: see `pending_entries`.)"""
    entries, foreign = _scan(store)
    problems = [(path.name, "?", f"{path} is {what}") for path, what in foreign]
    for path in entries:
        entry, problem = store.probe(path.name, verify=True)
        if problem is not None:
            problems.append((path.name, entry.name if entry else "?", problem))
    return problems


def pending_entries(store: OffloadStore) -> list[tuple[str, str]]:
    """(key, model) of every entry the manifest records but the directory lacks: the next
    load of that model writes it."""
    present = {path.name for path in iter_entry_files(store)}
    return [(key, models[0]) for key, models in sorted(_models_by_key(store).items())
            if key not in present]


@dataclass
class GcResult:
    entries: int = 0             # entry files removed
    bytes: int = 0               # their size
    temporaries: int = 0         # leftovers of killed writers removed
    models: list[str] = field(default_factory=list)   # manifest records dropped
    kept: int = 0                # entries kept
    foreign: list[str] = field(default_factory=list)  # non-regular entry names removed
    skipped: list[str] = field(default_factory=list)  # data/<xx> links left alone, not followed


def gc_store(store: OffloadStore, *, dry_run: bool = False) -> GcResult:
    """Remove what no model in the manifest needs: entries not listed, entries whose
    source file changed or is gone (a rerun can never ask for them: their key covers the
    source's identity), leftovers of killed writers, entry names that are no regular file
    (the name only); and drop model records left with no entries. A ``data/<xx>`` that is
    a link is never entered (`skipped`). With `dry_run`, only say what would go."""
    result = GcResult()
    with store.manifest_lock():
        manifest = store.read_manifest()
        files, foreign = _scan(store)
        entries: dict[str, Entry | None] = {}
        for path, what in foreign:
            if path.parent.name == "data" or what.startswith("a directory"):  # not ours to enter
                result.skipped.append(f"{path} is {what}")
            elif _remove_unlocked(store, path.name, [path], dry_run):
                result.foreign.append(f"{path} ({what.split(',')[0]})")
        for path in files:
            try:
                entries[path.name] = read_entry_file(str(path))
            except (OffloadError, OSError):
                entries[path.name] = None
        stale = {k for k, e in entries.items() if e is not None and not e.source.current()}
        changed = False
        for mid, record in list(manifest["models"].items()):
            # A listed key with no entry file yet is a load in progress (or a crash): kept.
            keep = [k for k in record["keys"] if k not in stale]
            if keep != record["keys"]:
                record["keys"], changed = keep, True
            if not keep:
                del manifest["models"][mid]
                result.models.append(mid)
        needed = {k for r in manifest["models"].values() for k in r["keys"]}
        for key in sorted(entries):
            if key in needed:
                result.kept += 1
                continue
            path = store.entry_file(key)
            size = path.lstat().st_size
            if _remove_unlocked(store, key, [path], dry_run):
                result.entries += 1
                result.bytes += size
        real = sorted(d for d in (store.root / "data").iterdir() if len(d.name) == 2 and _is_real_dir(d))
        for tmp in sorted(t for d in real for t in d.glob(".*.tmp.*")):
            key = tmp.name[1:].split(".tmp.", 1)[0]
            result.temporaries += _remove_unlocked(store, key, [tmp], dry_run)
        for tmp in sorted(store.root.glob(".manifest.json.tmp.*")):   # we hold its lock
            result.temporaries += 1
            if not dry_run:
                tmp.unlink(missing_ok=True)
        if changed and not dry_run:
            store.write_manifest(manifest)
    return result


def _remove_unlocked(store: OffloadStore, key: str, paths: list[Path], dry_run: bool) -> bool:
    """Remove `paths` if no process holds `key`'s stripe lock (none is writing it)."""
    lock = store.stripe_lock(key, timeout_s=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    try:
        if not dry_run:
            for p in paths:
                if not _is_real_dir(p.parent):   # replaced by a link since the scan
                    continue
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        return True
    finally:
        lock.release()
