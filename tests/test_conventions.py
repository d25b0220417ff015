"""Rules of the code base that a grep would state, checked on its syntax trees (docstrings
and comments aside): no Hugging Face weight name outside the model families and the
accelerate layer, and each default a named constant defined once."""

from __future__ import annotations

import ast
from pathlib import Path

import distload

PACKAGE = Path(distload.__file__).parent


def _trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE), ast.parse(path.read_text())


def _code_strings(tree: ast.AST):
    """The string constants of `tree` that are no docstring."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs]


def _number(node: ast.AST) -> float | None:
    ok = isinstance(node, ast.Constant) and type(node.value) in (int, float)
    return node.value if ok else None


def test_no_hugging_face_weight_name_outside_models_and_compat():
    names = ("lm_head", "embed_tokens", "norm.weight", "model.layers")
    found = [(str(rel), node.lineno, node.value) for rel, tree in _trees() if rel.parts[0] not in ("models", "compat")
             for node in _code_strings(tree) if any(name in node.value for name in names)]
    assert found == []


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
    assert shifts(1, 22) == ["checkpoint/dtypes.py"]             # FLOAT32_STEP_ELEMENTS
