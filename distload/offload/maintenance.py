"""Looking after an offload directory: list its entries, verify them, collect garbage.

Any process may run these while loads use the directory: `gc` holds the manifest lock and
removes an entry only while holding that entry's stripe lock (never one being written),
and loads record the entries they need in the manifest before using them.

Example::

    for row in list_entries(store): print(row["key"][:12], row["nbytes"], row["models"])
    bad = verify_store(store)          # [(key, name, problem), ...]
    result = gc_store(store)           # GcResult(entries=3, bytes=..., ...)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import Timeout

from .entry import Entry, OffloadError, read_entry_file
from .store import OffloadStore

__all__ = ["iter_entry_files", "list_entries", "verify_store", "pending_entries", "GcResult",
           "gc_store"]


def iter_entry_files(store: OffloadStore) -> Iterator[Path]:
    """Every published entry file (temporaries excluded), sorted."""
    data = store.root / "data"
    for sub in sorted(p for p in data.iterdir() if p.is_dir() and len(p.name) == 2):
        for path in sorted(sub.iterdir()):
            if not path.name.startswith(".") and path.name[:2] == sub.name:
                yield path


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
        row["disk_bytes"] = path.stat().st_size
        row["models"] = models.get(row["key"], [])
        rows.append(row)
    return rows


def verify_store(store: OffloadStore) -> list[tuple[str, str, str]]:
    """(key, tensor name, problem) for every entry whose size or checksum is wrong, or
    whose referenced source changed. Empty: all intact. (An entry a model recorded but
    nobody wrote yet — a load in progress, or one stopped by a full disk or a signal — is
    no problem: see `pending_entries`.)"""
    problems = []
    for path in iter_entry_files(store):
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


def gc_store(store: OffloadStore, *, dry_run: bool = False) -> GcResult:
    """Remove what no model in the manifest needs: entries not listed, entries whose
    source file changed or is gone (a rerun can never ask for them: their key covers the
    source's identity), leftovers of killed writers; and drop model records left with no
    entries. With `dry_run`, only say what would go."""
    result = GcResult()
    with store.manifest_lock():
        manifest = store.read_manifest()
        entries: dict[str, Entry | None] = {}
        for path in iter_entry_files(store):
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
            size = path.stat().st_size
            if _remove_unlocked(store, key, [path], dry_run):
                result.entries += 1
                result.bytes += size
        for tmp in sorted((store.root / "data").glob("*/.*.tmp.*")):
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
    lock = store.stripe_lock(key, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    try:
        if not dry_run:
            for p in paths:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        return True
    finally:
        lock.release()
