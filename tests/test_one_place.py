"""One place for each fact: no function of unetseg is written twice.

Two copies of a function drift apart (one gets a fix, the other does not). Functions are compared by their code, not
their names or docstrings, so a copy under another name is found too.
"""

from __future__ import annotations

import ast
import collections

from support import REPO


def _code(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
            isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    return ast.dump(node.args) + ast.dump(ast.Module(body=body, type_ignores=[]))


def test_no_function_is_written_twice():
    copies = collections.defaultdict(list)
    for path in sorted((REPO / "unetseg").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 3:
                copies[_code(node)].append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    twice = [where for where in copies.values() if len(where) > 1]
    assert not twice, f"the same function in several places: {twice}"
