"""Rules of the code base that a grep would state, checked on its syntax trees (docstrings
and comments aside): each default a named constant defined once."""

from __future__ import annotations

import ast
from pathlib import Path

import distload

PACKAGE = Path(distload.__file__).parent


def _trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE), ast.parse(path.read_text())


def _number(node: ast.AST) -> float | None:
    ok = isinstance(node, ast.Constant) and type(node.value) in (int, float)
    return node.value if ok else None


def test_each_default_is_named_once():
    trees = list(_trees())
    timeouts = [str(rel) for rel, tree in trees for node in ast.walk(tree) if _number(node) == 600]
    assert timeouts == ["dist.py"]                      # DEFAULT_TIMEOUT_S

    def shifts(value: int, by: int) -> list[str]:
        return [str(rel) for rel, tree in trees for node in ast.walk(tree)
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.LShift)
                and _number(node.left) == value and _number(node.right) == by]

    assert shifts(64, 10) == ["io/base.py"]             # MIN_STAGING_BYTES
    # the staging default (a flag) and the chunk of whole-file writes and hashes
    assert sorted(shifts(16, 20)) == ["checkpoint/files.py", "io/base.py"]
