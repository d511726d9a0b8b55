"""Renamed and reformatted copies of code: how a contaminated copy hides from exact and n-gram checks.

Used to salt corpora when testing and benchmarking decontamination: the copy computes the same thing, but every
name it binds is new, docstrings are gone, and layout (indentation, quotes, spacing, comments) differs.
"""

from __future__ import annotations

import ast
import builtins
import random


class _Renamer(ast.NodeTransformer):
    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping

    def visit_Name(self, node: ast.Name) -> ast.Name:
        node.id = self.mapping.get(node.id, node.id)
        return node

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.arg = self.mapping.get(node.arg, node.arg)
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        node.name = self.mapping.get(node.name, node.name)
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str) and len(body) > 1:
            node.body = body[1:]
        self.generic_visit(node)
        return node


def bound_names(tree: ast.AST) -> set[str]:
    """Names the code binds itself (functions, arguments, assignment targets), imports excluded."""
    names: set[str] = set()
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names - imported - set(dir(builtins))


def rename_and_reformat(source: str, seed: int = 0) -> tuple[str, dict[str, str]]:
    """(the rewritten source, {old name: new name}); the code behaves as before.

    Raises SyntaxError when `source` does not parse.
    """
    rng = random.Random(seed)
    tree = ast.parse(source)
    words = ["alpha", "beta", "gamma", "delta", "item", "value", "data", "result", "acc", "node", "thing", "buf"]
    mapping = {}
    for number, name in enumerate(sorted(bound_names(tree))):
        mapping[name] = f"{rng.choice(words)}_{number}{rng.randint(10, 99)}"
    tree = _Renamer(mapping).visit(tree)
    text = ast.unparse(ast.fix_missing_locations(tree))
    lines = []
    for line in text.split("\n"):
        stripped = line.lstrip(" ")
        depth = (len(line) - len(stripped)) // 4
        lines.append("  " * depth + stripped)  # two-space indentation instead of four
        if stripped.startswith(("for ", "while ", "if ")) and rng.random() < 0.5:
            lines.append("  " * (depth + 1) + "# step")
    return "# rewritten copy\n" + "\n".join(lines) + "\n", mapping
