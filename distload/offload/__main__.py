"""`python -m distload.offload ls|verify|gc DIR`: look after an offload directory.

    ls DIR            entries with their sizes, kinds and the models they came from
    verify DIR        check every entry's size and checksum (exit 1 if any is bad)
    gc DIR            remove entries no model in the manifest needs (--dry-run: only list);
                      exit 1 if it left a data/<xx> that is a link alone (never followed)

Safe to run while loads use the directory (see `distload.offload.maintenance`).

Example::

    python -m distload.offload ls ~/.cache/distload/offload
"""

from __future__ import annotations

import argparse
import os
import sys

from .entry import OffloadError
from .maintenance import foreign_entries, gc_store, list_entries, pending_entries, verify_store
from .store import OffloadStore

__all__ = ["main"]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _ls(store: OffloadStore, args) -> int:
    for path, what in foreign_entries(store):
        print(f"not an entry: {path} is {what}", file=sys.stderr)
    rows = list_entries(store)
    if not rows:
        print(f"{store.root}: no entries")
        return 0
    print(f"{'key':<14} {'kind':<5} {'bytes':>12} {'on disk':>12} {'dtype':<9} {'shape':<16} name")
    for r in rows:
        print(f"{r['key'][:12]:<14} {r['kind']:<5} {r['nbytes']:>12} {r['disk_bytes']:>12} "
              f"{r['dtype']:<9} {'x'.join(map(str, r['shape'])) or '-':<16} {r['name']}")
        if args.verbose:
            print(f"{'':<14} source {r['source']}")
    models: dict[str, list[dict]] = {}
    for r in rows:
        for m in r["models"] or ["(no model: gc removes it)"]:
            models.setdefault(m, []).append(r)
    print()
    for m, rs in sorted(models.items()):
        refs = sum(r["kind"] == "ref" for r in rs)
        print(f"{m}: {len(rs)} entries ({refs} zero-copy), {_mb(sum(r['nbytes'] for r in rs))} of "
              f"tensors, {_mb(sum(r['disk_bytes'] for r in rs))} on disk")
    print(f"total: {len(rows)} entries, {_mb(sum(r['disk_bytes'] for r in rows))} on disk in {store.root}")
    return 0


def _verify(store: OffloadStore, args) -> int:
    problems = verify_store(store)
    for key, name, problem in problems:
        print(f"BAD {key[:12]} {name}: {problem}")
    count = sum(1 for _ in list_entries(store))
    print(f"{count} entries checked, {len(problems)} problem(s)"
          + ("; the next load that needs a bad entry rewrites it" if problems else ""))
    pending = pending_entries(store)
    if pending:
        print(f"{len(pending)} entries recorded but not written yet (e.g. for {pending[0][1]}); "
              "the next load of that model writes them")
    return 1 if problems else 0


def _gc(store: OffloadStore, args) -> int:
    res = gc_store(store, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {res.entries} entries ({_mb(res.bytes)}), {res.temporaries} temporary file(s) "
          f"and {len(res.models)} model record(s); kept {res.kept} entries")
    for m in res.models:
        print(f"  model record: {m}")
    for f in res.foreign:
        print(f"  {'would remove' if args.dry_run else 'removed'} a name that is no entry file: {f}")
    for s in res.skipped:
        print(f"  left alone: {s}; remove it by hand", file=sys.stderr)
    return 1 if res.skipped else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distload.offload",
                                     description="Look after a distload offload directory.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (("ls", _ls, "list entries and the models they came from"),
                                ("verify", _verify, "check every entry's size and checksum"),
                                ("gc", _gc, "remove entries no model in the manifest needs")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("dir", help="the offload directory")
        p.set_defaults(fn=fn)
        if name == "ls":
            p.add_argument("-v", "--verbose", action="store_true", help="show each entry's source file")
        if name == "gc":
            p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.dir):
        parser.error(f"{args.dir} is not a directory")
    if not os.path.isdir(os.path.join(args.dir, "data")):
        parser.error(f"{args.dir} is not an offload directory (it has no data/)")
    try:
        return args.fn(OffloadStore(args.dir), args)
    except (OffloadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
